"""The stages of prx-data: each module defines STAGE."""
