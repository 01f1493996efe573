"""The audit's map -> reduce: sketches, partial states (safetensors, no pickle), Dask executor, resume."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from captioners import checks, refusals
from pipeline.audit import figures, scan, sketches, state
from pipeline.stages.audit import main as audit
from test_audit import WEB, write_folder


def test_minhash_equals_datasketch():
    """The compiled MinHash equals datasketch's, edge hash values included; its band keys equal band_keys."""
    from datasketch import MinHash

    rng = np.random.default_rng(0)
    lens = [10, 25, 15, 1, 40]
    sh = rng.integers(0, 2**32, size=sum(lens), dtype=np.uint64)
    sh[:3] = [0, 2**32 - 1, 2**31]
    owner = np.repeat(np.arange(len(lens)), lens)
    sig, keys = sketches.minhash_signatures(sh, owner, len(lens), 64, (5, 11))
    for c in range(len(lens)):
        m = MinHash(num_perm=64, scheme="legacy", hashfunc=lambda x: int(x))
        m.update_batch(sh[owner == c].tolist())
        assert np.array_equal(sig[c], m.hashvalues)
    assert np.array_equal(keys, sketches.band_keys(sig, 5, 11))
    for num_perm, seed in ((64, 1), (32, 1), (128, 7)):   # drawn without datasketch: its own permutations
        want = MinHash(num_perm=num_perm, seed=seed, scheme="legacy").permutations
        assert all(np.array_equal(x, y) for x, y in zip(sketches.permutations(num_perm, seed), want))


def test_distinct_words_per_caption():
    rng = np.random.default_rng(1)
    lens = rng.integers(1, 30, size=40)
    ids = rng.integers(0, 12, size=int(lens.sum())).astype(np.uint64)
    starts = np.r_[0, np.cumsum(lens)[:-1]]
    want = [len(set(ids[s:s + n].tolist())) for s, n in zip(starts, lens)]
    assert scan._distinct_per_caption(ids, starts, lens).tolist() == want


def test_workers_use_the_bands_the_driver_computed():
    """Workers take (bands, rows) from the driver: a scan never imports datasketch (nor its scipy.integrate)."""
    code = ("import sys; from pipeline.audit import scan, sketches, state; sketches.remember_bands(0.8, 64, (5, 12)); "
            "g = scan.scan_group(['a red car on the road', 'a blue car'], state.AuditParams()); "
            "assert g.arrays['bands'].shape == (2, 5); "
            "assert not {'datasketch', 'scipy.integrate'} & set(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)
    assert sketches.lsh_bands(0.8, 64) == (5, 11)   # what datasketch chooses (the driver passes it on)


WORDS = ("a the red small old dog cat car street house tree woman man child sits runs near under beside on "
         "photo of with and in front garden river bridge").split()
SPECIAL = ["", "   ", "!!! ...", "a", "a b", "Don’t stop — state-of-the-art!",
           "a\u00a0b\u2028c \t d\n\ne\x1cf\u3000g\u0085h", "the cat the cat the cat sat",
           "I’M SORRY, I can’t help with that image.", "x_y z-w 'q' ’r’ --x y-- it's", "Ünïcödé wörds ßtraße",
           "数字 123 abc", "a a a a a a a a a a", "As an AI, I cannot see the image.",
           "Une petite maison blanche au bord de la mer", "CAPS LOCK CAPTION"]


def _golden_texts() -> list[str]:
    rng = random.Random(7)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.choice([3, 12, 40]))).capitalize() + "."
             for _ in range(600)]
    texts += SPECIAL
    return texts + texts[:40]


def _digest(state: state.GroupState) -> str:
    """A state's digest, independent of the partial-state format (the JSON of every field, as the .npz meta held
    them when the digests below were taken)."""
    d = {f.name: getattr(state, f.name) for f in dataclasses.fields(state) if f.name != "arrays"}
    d = {k: (dict(v) if isinstance(v, Counter) else v) for k, v in d.items()}
    d["clip"] = {name: dict(c) for name, c in state.clip.items()}
    h = hashlib.sha256(json.dumps(json.loads(json.dumps(d)), sort_keys=True).encode())
    for k in sorted(state.arrays):
        h.update(k.encode())
        h.update(np.ascontiguousarray(state.arrays[k]).tobytes())
    return h.hexdigest()


def test_scan_states_equal_the_previous_implementation():
    """The shard-batched scan (word-hash table, numpy type-token ratios, per-permutation MinHash, fast ASCII
    words) gives byte-identical partial states to a per-caption reference loop (digests from that loop):
    partial states written before and after the change merge into the same figures."""
    def detect(text):
        if "maison" in text.lower():
            return "fr", 0.9
        return ("en", 0.8) if len(text) > 30 else (("de", 0.4) if len(text) > 10 else (None, 0.0))

    texts = _golden_texts()
    s = scan.scan_group(texts, state.AuditParams(language_sample=0), detect=detect)
    assert _digest(s) == "44d22f9cfe25aeb1e2653993452207d77ae3c7c0ddc16bb37536cee6f68973a0"
    s = scan.scan_group(texts, state.AuditParams(language_sample=0, shingle=5, num_perm=32, loop_repeats=2))
    assert _digest(s) == "7819871315fd330bad63d65188a02071d6a85e6820c986c0494552f59a053f4e"


def test_fast_word_path_equals_the_word_regex():
    rng = np.random.default_rng(3)
    alphabet = list("abcz09_ -'.,!?;:()\"/\t\n") + ["’", "é", "ß", "—"]
    for _ in range(3000):
        text = "".join(rng.choice(alphabet, size=int(rng.integers(0, 30))))
        assert scan.words_of(text) == scan.WORD_RE.findall(text.lower()), repr(text)


def test_hist_quantile_is_numpy_percentile():
    rng = np.random.default_rng(1)
    values = rng.integers(0, 50, size=999)
    c = Counter(values.tolist())
    keys = np.array(sorted(c), dtype=float)
    counts = np.array([c[k] for k in sorted(c)])
    for q in (0.05, 0.5, 0.95, 0.0, 1.0):
        assert figures.hist_quantile(keys, counts, q) == pytest.approx(np.percentile(values, 100 * q))


def test_distinct_switches_to_hll_beyond_cap():
    d = sketches.Distinct(cap=1000)
    rng = np.random.default_rng(2)
    for _ in range(20):
        d.add(np.unique(rng.integers(0, 2**63, size=5000, dtype=np.uint64)))
    value, exact = d.count()
    assert not exact and value == pytest.approx(100_000, rel=0.03)
    small = sketches.Distinct(cap=1000)
    small.add(np.array([1, 2, 3], dtype=np.uint64))
    small.add(np.array([3, 4], dtype=np.uint64))
    assert small.count() == (4.0, True)


def test_misra_gries_keeps_heavy_items():
    top = sketches.TopCounts(capacity=3)
    top.update({"a": 10, "b": 5, "c": 1, "d": 1, "e": 1})
    top.update({"a": 5, "f": 2})
    assert top.top(1)[0][0] == "a" and top.error > 0
    assert 15 - top.error <= top.counts["a"] <= 15


def test_partial_state_roundtrip_without_pickle():
    clip = [{"clip:x": 0.3}, {"clip:x": 0.3}, {"clip:x": 1e30}]   # a huge score: beyond int64 once scaled
    g = scan.scan_group(["a red car", "", "very very very good"], state.AuditParams(), clip=clip)
    data = state.to_bytes({'["*", "s", "v"]': g}, {"dataset": "d"})
    from safetensors.numpy import load
    assert set(load(data)) == {"meta", *(f"g0_{n}" for n in ("uniq1", "uniq2", "uniq3", "dups", "bands"))}
    back, extra = state.from_bytes(data)
    h = back['["*", "s", "v"]']
    assert extra == {"dataset": "d"} and h.words == Counter({3: 1, 4: 1}) and h.loops == 1
    assert h.clip == {"clip:x": Counter({3000: 2, round(1e30 * 10_000): 1})}
    assert all(np.array_equal(h.arrays[k], g.arrays[k]) for k in g.arrays)
    with pytest.raises(Exception):
        state.from_bytes(data[:-8])                      # a truncated blob is refused by safetensors


def test_merged_clip_counts_equal_counter_sums():
    """GroupAcc sums the shards' CLIP histograms in numpy (IntHist): the same counts as Counter.update, huge
    keys included, across the consolidations."""
    rng = np.random.default_rng(3)
    params = state.AuditParams()
    acc, want = figures.GroupAcc(params), Counter()
    for i in range(300):
        scores = rng.integers(0, 4000, size=500).tolist() + ([10**30] if i % 50 == 0 else [])
        g = state.GroupState(clip={"clip:a": Counter(scores)}, arrays=scan._empty_arrays(params))
        acc.add(g)
        want.update(scores)
    assert acc.clip_counts() == {"clip:a": want}


def _figures(path):
    r = json.loads(path.read_text())
    return {g["name"]: g["figures"] for g in r["groups"]}, r


def test_dask_equals_local_and_resume(tmp_path, capsys):
    write_folder(tmp_path / "web", WEB, "web")
    common = [str(tmp_path / "web"), "--no-progress", "--language-sample", "2"]
    assert audit(common + ["--executor", "local", "--json", str(tmp_path / "local.json")]) == 0
    assert audit(common + ["--executor", "dask", "--workers", "2", "--json", str(tmp_path / "dask.json")]) == 0
    local, _ = _figures(tmp_path / "local.json")
    dask, _ = _figures(tmp_path / "dask.json")
    assert local == dask
    out = tmp_path / "out"
    assert audit(common + ["--executor", "local", "--out", str(out)]) == 0
    assert sorted(p.name for p in (out / "_map").iterdir()) == ["000000.safetensors", "000001.safetensors"]
    (out / "_map" / "000001.safetensors").unlink()
    assert audit(common + ["--executor", "local", "--out", str(out)]) == 0
    again, r = _figures(out / "audit.json")
    assert r["shards_resumed"] == 1 and again == local and (out / "audit.html").exists()
    assert audit(common + ["--executor", "local", "--out", str(out), "--near-threshold", "0.5"]) == 2
    assert "config hash" in capsys.readouterr().err


def test_lazy_hll_equals_hll_of_everything_added():
    """The registers built at the switch from the exact set equal feeding every batch to the HLL as it came."""
    rng = np.random.default_rng(5)
    batches = [np.unique(rng.integers(0, 2**63, size=3000, dtype=np.uint64)) for _ in range(10)]
    d = sketches.Distinct(cap=5000)
    for b in batches:
        d.add(b)
    eager = np.zeros(1 << sketches.HLL_P, dtype=np.uint8)
    for b in batches:
        np.maximum(eager, sketches.hll_registers(b), out=eager)
    value, exact = d.count()
    assert not exact and np.array_equal(d.reg, eager) and value == sketches.hll_estimate(eager)


def test_language_memo_keeps_counts():
    """Repeated captions are detected once, but every sampled caption is still counted."""
    calls = []

    def detect(text):
        calls.append(text)
        return ("fr", 0.9) if "maison" in text else ("en", 0.9)

    texts = ["a cat on a mat", " a cat on a mat ", "une maison", "a dog", "une maison"]
    s = scan.scan_group(texts, state.AuditParams(language_sample=0), detect=detect)
    assert s.language_checked == 5 and s.wrong_language == 2 and s.languages == {"en": 3, "fr": 2}
    assert sorted(calls) == ["a cat on a mat", "a dog", "une maison"]
    s = scan.scan_group(texts, state.AuditParams(language_sample=2), detect=detect)
    assert s.language_checked == 2 and s.languages == {"en": 2}


def test_clip_counts_and_provenance_equal_the_per_caption_loop():
    """CLIP scores are counted at 1e-4 resolution with Python's round() (half to even) whether they take the
    numpy path or, for huge values, the one-by-one path; provenance dicts shared by many captions count once
    each caption."""
    rng = np.random.default_rng(3)
    scores = [0.00005, 0.00015, 0.00025, -0.00005, 0.31415, 0.2, 1e30, -1e17] + rng.random(200).tolist()
    clip = [{"clip:a": v} for v in scores] + [{"clip:b": 0.5, "clip:a": 0.5}] * 3
    shared = {"model": {"id": "Q", "revision": "main"}, "prompt": {"file": "s.txt", "sha256": "0123456789abcdef0"}}
    provs = [shared] * 5 + [None, {"model": "m", "prompt": "p"}] + [dict(shared) for _ in range(4)]
    s = state.GroupState()
    scan._add_clip_provenance(s, clip, provs)
    want: dict = {}
    for c in clip:
        for name, v in c.items():
            want.setdefault(name, Counter())[int(round(v * state.CLIP_SCALE))] += 1
    assert s.clip == want
    assert s.clip["clip:a"][0] == 2                        # +-0.5 -> 0: half to even
    assert s.clip["clip:a"][round(1e30 * 10_000)] == 1     # a huge score is kept, as a Python int
    assert s.models == Counter({"Q@main": 9, "(none recorded)": 1, "m": 1})
    assert s.prompts == Counter({"s.txt sha256:0123456789ab": 9, "(none recorded)": 1, "p": 1})
    s = state.GroupState()
    scan._add_clip_provenance(s, [{"clip:a": 0.25}, {"clip:a": 0.35}, {"clip:a": 0.25}], [])
    assert list(s.clip["clip:a"].items()) == [(2500, 2), (3500, 1)]      # keys in order of first appearance


def _first_letters(pattern: str) -> set[str]:
    """The letters a pattern's matches can start with: after \\b, one letter or its first group's alternatives."""
    body = pattern.removeprefix(r"\b")
    if body.startswith("(?:"):
        return {alt[0] for alt in body[3:body.index(")")].split("|")}
    return {body[0]}


def test_refusal_regex_lookahead_holds_for_every_pattern():
    """REFUSAL_RE skips positions not starting with one of FIRST_LETTERS: true only while every pattern starts so."""
    import re

    for p in refusals.REFUSAL_PATTERNS:
        first = _first_letters(p)
        assert all(c.isalpha() for c in first) and first <= set(refusals.FIRST_LETTERS), (p, first)
    plain = re.compile("|".join(f"(?:{p})" for p in refusals.REFUSAL_PATTERNS))
    texts = [t.lower() for t in SPECIAL] + ["no image was provided", "unable to view the image", "i apologise",
                                             "the picture is unavailable", "there's no image", "cannot see this image"]
    assert [plain.search(t) and plain.search(t).group(0) for t in texts] == \
        [refusals.REFUSAL_RE.search(t) and refusals.REFUSAL_RE.search(t).group(0) for t in texts]


def test_refusal_prefilter_passes_every_pattern():
    """may_refuse is a necessary condition: one refusal per pattern (and per alternative) passes it. "I'm
    unable to ..." is caught (the pattern once wanted "i 'm unable", with a space)."""
    one_each = ["i'm sorry", "im sorry", "i am sorry", "i apologize", "i apologise", "i can't help",
                "i cannot assist", "i can not provide", "i am unable to describe", "i'm unable to see",
                "i am not able to view", "i'm not able to caption", "as an ai", "as a language model",
                "i don't see an image", "i dont see the image", "i do not have any image", "no image was provided",
                "no image is shared", "no image has been shown", "unable to open the image",
                "cannot identify this image", "there is no image", "there's no image", "image is not available",
                "picture is unavailable"]
    for text in one_each:
        assert refusals.REFUSAL_RE.search(text), text
        assert refusals.may_refuse(text), text
        assert refusals.may_refuse(f"well, {text}, sadly")
    assert not refusals.may_refuse("a red car parked near a small house at sunset")


# One definition (captioners.refusals): what the recaption check rejects as a refusal, the audit counts as one.
REFUSED = [
    "I'm sorry, but I cannot describe this image for you.",
    "I’m sorry, I can’t help with that image.",
    "As an AI, I am unable to see images but a cat may be there.",
    "I apologise, but no image was attached to your message.",
    "Unfortunately I am unable to view the image you sent.",
    "It seems there is no image in your message.",
    "I don't see an image here; please upload one.",
    "The picture is unavailable, so no caption can be written.",
    "No image has been uploaded yet.",
    "Sorry, cannot describe this image.",
]
NOT_REFUSED = [
    "A tabby cat sits on a wooden table near a bright window.",
    "A neon sign reading I can't wait hangs above a busy bar.",
    "A woman holds a poster that says I cannot stop dancing.",
    "A billboard advertises new apartments available now.",
    "A man is unable to reach the top shelf in a small kitchen.",
    "Tickets are not available at the door, says a handwritten sign.",
]


@pytest.mark.parametrize("text, refused", [(t, True) for t in REFUSED] + [(t, False) for t in NOT_REFUSED])
def test_the_recaption_check_and_the_audit_agree_on_refusals(text, refused):
    only_refusal = checks.CheckConfig(skip=frozenset(checks.CHECK_NAMES) - {"refusal"})
    failure = checks.run_checks(text, "stop", only_refusal)
    assert (failure.reason if failure else None) == (checks.REFUSAL if refused else None), text
    assert scan.scan_group([text], state.AuditParams()).refusals == int(refused), text


def test_near_duplicate_clusters_link_captions_sharing_any_bucket():
    """Clusters = connected components of 'shares a band key', checked against a union-find over all pairs."""
    rng = np.random.default_rng(4)
    for n, spread in ((1, 5), (60, 40), (300, 900), (300, 10**12)):
        keys = rng.integers(0, spread, size=(n, 4)).astype(np.uint64)
        parent = list(range(n))

        def root(i):
            while parent[i] != i:
                i = parent[i]
            return i

        for a in range(n):
            for b in range(a + 1, n):
                if (keys[a] == keys[b]).any():
                    parent[root(a)] = root(b)
        assert sketches.near_duplicate_clusters(keys) == len({root(i) for i in range(n)}), (n, spread)
    assert sketches.near_duplicate_clusters(np.zeros((0, 4), dtype=np.uint64)) == 0
