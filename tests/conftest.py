"""Test tiers: cpu (torch path vs the reference), interpret (Triton under TRITON_INTERPRET=1 on CPU
tensors), gpu (Triton on CUDA; skipped without it).

On a machine without CUDA the interpreter is switched on here, before anything imports Triton, so
that plain `pytest` runs the cpu and interpret tiers together.
"""

import importlib
import os
import shutil

if "TRITON_INTERPRET" not in os.environ and not (os.path.exists("/dev/nvidiactl") and shutil.which("nvidia-smi")):
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

# Triton imported now, under the setting above: Triton fixes the interpreter on or off when it is first
# imported, so a test that flips TRITON_INTERPRET (to check that the ops refuse it) must not be the first
# to import it (run first, it turned the interpreter off for every later kernel: 37 failures).
try:
    importlib.import_module("triton")
except Exception:  # pragma: no cover - a platform without Triton runs the cpu tier only
    pass

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()


def _old_triton() -> str | None:
    """The Triton version where it is older than the kernels support (their tests skip there: the torch
    path is what such an install runs, and the cpu tier still checks it); None otherwise."""
    from fasthydra.ops import _common

    try:
        found = _common._triton_version()
    except ImportError:
        return None
    return None if found >= _common.MIN_TRITON else ".".join(map(str, found))


def pytest_collection_modifyitems(config, items):
    skip_interp = pytest.mark.skip(reason="interpret tier needs TRITON_INTERPRET=1 (set before triton is imported)")
    skip_gpu = pytest.mark.skip(reason="gpu tier needs a CUDA device")
    old = _old_triton()
    skip_old = pytest.mark.skip(reason=f"fasthydra's kernels need Triton 3.6 or later (found {old})")
    for item in items:
        if "interpret" in item.keywords and not INTERPRETING:
            item.add_marker(skip_interp)
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if old and any(k in item.keywords for k in ("interpret", "gpu", "kernels")):
            item.add_marker(skip_old)


# Every test starts from this seed. FASTHYDRA_TEST_SEED draws other data: a test whose tolerance holds only for the
# default draws is a bug (a GPU, another torch, another machine draws other values; the fortieth session found
# one under torch 2.11), and a run under a few other seeds finds such tests before they fail elsewhere.
TEST_SEED = int(os.environ.get("FASTHYDRA_TEST_SEED", "1234"))
POISON = os.environ.get("FASTHYDRA_TEST_POISON", "0") not in ("", "0")
# FASTHYDRA_TEST_SHUFFLE=1: every interpreted launch runs its programs in a random order, as a GPU may finish them
# (helpers.shuffle_interpreted_programs).
SHUFFLE = os.environ.get("FASTHYDRA_TEST_SHUFFLE", "0") not in ("", "0")


# FASTHYDRA_TEST_RACES=1: every interpreted launch is watched for programs that store to one address, or load what
# another program stores before an atomic orders them (helpers.watch_interpreted_races); a test with one fails.
RACES = os.environ.get("FASTHYDRA_TEST_RACES", "0") not in ("", "0")


@pytest.fixture(autouse=True, scope="session")
def _watched_programs():
    if not ((SHUFFLE or RACES) and INTERPRETING):
        yield None
        return
    from helpers import shuffle_interpreted_programs, watch_interpreted_races

    with pytest.MonkeyPatch.context() as patch:
        if SHUFFLE:
            shuffle_interpreted_programs(patch, TEST_SEED)
        yield watch_interpreted_races(patch) if RACES else None


@pytest.fixture(autouse=True)
def _no_races(_watched_programs):
    yield
    if _watched_programs is None:
        return
    found = [line for line in _watched_programs if not line.startswith("_racy")]  # (the watcher's own test kernels)
    _watched_programs.clear()
    assert not found, f"races between programs: {found}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(TEST_SEED)
    # ... in IEEE arithmetic on this thread: torch 2.4's inductor links its CPU kernels with -ffast-math, whose
    # crtfastmath.o sets FTZ and DAZ in the thread that loads one, and that thread then flushes subnormals for the
    # rest of the process (CI's torch 2.4 stage: 129 subnormal tests after the first torch.compile test failed).
    # The library's own C kernel keeps them whatever the caller's mode (test_native's flushing-caller test).
    torch.set_flush_denormal(False)
    if not POISON:
        yield
        return
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.fixture
def no_impl_env(monkeypatch):
    monkeypatch.delenv("FASTHYDRA_IMPL", raising=False)


# x86 instruction-set levels whose build of the C kernels (fasthydra/ops/csrc) the `isa` fixture runs beside this
# host's own, with the CPU flags each needs (as /proc/cpuinfo names them; lzcnt is "abm").
ISA_LEVELS = {
    "x86-64": set(),  # SSE2: no FMA, no AVX (the kernels' portable maxima)
    "x86-64-v3": {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"},  # AVX2 and FMA
}
_isa_builds: dict = {}


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


@pytest.fixture(params=["native", *ISA_LEVELS])
def isa(request, monkeypatch):
    """The C kernels as built for this host (-march=native), then as built for other x86 levels this host can
    run: the code users' CPUs run, checked against float64 whatever CPU CI has (an AVX-512 host never runs
    the AVX2 code, where gcc once emitted wrong masked loads: bench/RESULTS.md, thirtieth session). Each
    build comes from the library's cache like the native one."""
    import platform

    from fasthydra.ops import native

    level = request.param
    if native.status() != "ok":
        pytest.skip(f"native kernel unavailable here: {native.status()}")
    if level == "native":
        return level
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip(f"{level} is an x86 level; this host is {platform.machine()}")
    missing = ISA_LEVELS[level] - _cpu_flags()
    if missing:
        pytest.skip(f"this CPU cannot run {level} code (no {', '.join(sorted(missing))})")
    if level not in _isa_builds:
        try:
            _isa_builds[level] = native._build(level)
        except (RuntimeError, OSError) as exc:  # (a compiler that does not know the level: gcc < 11, clang < 12)
            _isa_builds[level] = exc
    lib = _isa_builds[level]
    if isinstance(lib, Exception):
        pytest.skip(f"no {level} build here: {lib}")
    monkeypatch.setattr(native, "_lib", lib)
    monkeypatch.setattr(native, "_team", not native._forked and native._on_torch_team(lib))
    return level


@pytest.fixture(params=[(50, None, False), (50, 16, False), (50, 16, True), (10, None, False)],
                ids=["C=50-row-whole", "C=50-tiles-of-16", "C=50-tiles-of-16-spread", "C=10"])
def classes(request, monkeypatch):
    """C and the row kernels' walk, for tests of masked classes: C = 50 held whole (the default) and in 16-class
    tiles, the last one partial (running maxima and sums carried across tiles, a tile that is all masked on both
    sides; `uncertainty`'s forward and backward walk such tiles too), those tiles also in spread slices (forced: a
    GPU launch takes them on rows of C not a multiple of 16 only where the tile has a slice for every thread,
    ops/_common.spread_slices); C = 10, rows under 16 classes, which the Triton loss kernel and the C kernels take
    one row per vector lane. (C was 40 until the C loss kernel took rows under 48 classes on their side too: 50
    keeps its long rows under these tests.)"""
    from fasthydra.ops import _common

    c, tile, spread = request.param
    if spread:
        monkeypatch.setattr(_common, "spread_slices", lambda cfg, vec, n_cols, *rows: not cfg.get("ROW_IN_REGISTERS"))
    if tile is not None:
        for knob in ("MAX_BLOCK_C", "ROW_TILE_MAX", "UNCERTAINTY_TILE_MAX", "UNCERTAINTY_LONG_TILE",
                     "UNCERTAINTY_GRAD_ROW_MAX"):
            monkeypatch.setattr(_common, knob, tile)
        monkeypatch.setattr(_common, "UNCERTAINTY_GRAD_TILE", 2 * tile)
        assert not _common.kl_rows_config(c)["ROW_IN_REGISTERS"]
        assert not _common.uncertainty_config(3, c)["ROW_IN_REGISTERS"]
        assert not _common.uncertainty_grad_config(3, c)["ROW_IN_REGISTERS"]
    return c
