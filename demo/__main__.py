import sys

from demo.main import main

sys.exit(main(sys.argv[1:]))
