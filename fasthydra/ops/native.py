"""The torch path's native kernels (csrc/hydra_kl_rows.c): built once per machine, called through ctypes.

Why they exist: on a CPU the torch-op version of the softmax/KL/gradient step makes about sixteen
sweeps over each row chunk (two softmaxes, their normalisers, the product and its sum, q - p); the
C row kernel makes three, with the row hot in cache, and two exponentials per element. At the mid
benchmark shape that is the difference between ~1.45x and ~1.25x of the GEMM floor (bench/RESULTS.md).
The same idea serves the class-tiled mode of large C (``tile_stats``, ``tile_grad``: one sweep per
tile row and pass), ``uncertainty`` (``uncertainty_rows``: 2.3x to 4.7x the torch ops, faster
than torch.compile at every benchmark shape) and the Hinton loss's target (``log_mean_rows``, the same mixture:
a step at (512, 4, 32000) 964 -> 255 ms, eager 720).

Threads: the kernels split their rows into torch.get_num_threads() parts. Where the library builds with OpenMP
and binds to the OpenMP runtime torch uses (the loader shares torch's libgomp.so.1 by its name), the parts run on
torch's own intra-op team, the threads that just ran the torch op before and still spin waiting for work.
Elsewhere (no OpenMP, bound to another runtime than torch's, a forked child, whose team does not exist) a pool of
Python threads takes the parts; right after a torch op its threads share the cores with torch's spinning ones
(at (1024, 8, 1000) ``log_mean_rows`` after an ``amax``: 13.8 ms in the pool, 7.6 on the team, on two cores).

The library is compiled on first use with the system C compiler (``cc``; gcc or clang) into
``$FASTHYDRA_CACHE_DIR`` (default ``~/.cache/fasthydra``), keyed by the source, the flags, the
compiler and the CPU, and written atomically so that several processes may race safely. No
compiler, a failed build or ``FASTHYDRA_NATIVE=0`` all fall back to the torch ops (same results to
float rounding); ``status()`` says which one runs and why, ``build_flags()`` with which flags it was built.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch

SOURCE = pathlib.Path(__file__).with_name("csrc") / "hydra_kl_rows.c"
FLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared"]
# The host's own instruction set, in the first spelling the compiler takes: -march=native (gcc, clang 15 and later),
# -mcpu=native, else the target's baseline (every x86-64 or ARMv8 CPU runs it). clang before 15 knows no
# -march=native on ARM (Apple's clang 14 on an M1 or M2, Ubuntu 22.04's clang 14 on Graviton: "the clang compiler
# does not support '-march=native'"), and a cross compiler knows no host at all.
HOST_ARCH = (["-march=native"], ["-mcpu=native"], [])
OPENMP = ["-fopenmp"]  # tried first; a compiler without it builds the library without (the Python pool splits rows)
MIN_ROWS_PER_THREAD = 32  # below this a thread costs more than it saves
# Each part's scratch starts this many floats (128 bytes: a cache line and the pair its neighbour is prefetched
# with) after the last one's: parts that write scratch rows within one line slow each other down (false sharing:
# `uncertainty` at (4096, 8, 10) took 3.1 ms on two threads, 2.1 on one, 1.4 with the parts apart).
SCRATCH_ALIGN = 32

_lock = threading.Lock()
_lib = None
_reason = "not built yet"
_pool: ThreadPoolExecutor | None = None
_team = False  # rows split on the OpenMP team (torch's) rather than on _pool: _library() decides
_forked = False  # this process is a forked child: never the team
_built_with: list = []  # the flags the library in use was built with


def _forget_pool_after_fork() -> None:
    # A forked child inherits the pool object but not its threads: submitting to it would hang. Its OpenMP team
    # does not exist either (torch's own parallel ops hang in such a child): the child splits rows on a new pool.
    global _pool, _lock, _team, _forked
    _pool = None
    _lock = threading.Lock()
    _team, _forked = False, True


if hasattr(os, "register_at_fork"):  # POSIX; elsewhere there is no fork
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


def _cpu_signature() -> str:
    """What tells this CPU's instruction set apart, for the cache key (a home folder shared by machines of other CPUs
    must not hand one a library built for another): x86 Linux's model name and flags, ARM Linux's implementer, part
    and features, elsewhere (macOS: no /proc/cpuinfo) the processor's name."""
    keys = ("model name", "flags", "CPU implementer", "CPU architecture", "CPU variant", "CPU part", "Features")
    seen: dict = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:  # the first core's lines
                key = line.split(":", 1)[0].strip()
                if key in keys and key not in seen:
                    seen[key] = line
    except OSError:
        pass
    if seen:
        return "".join(seen[key] for key in keys if key in seen)
    try:  # macOS: "Apple M2 Pro"
        brand = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                               timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        brand = ""
    return f"{platform.machine()} {platform.processor()} {brand}"


def _compiler() -> str | None:
    """$CC, else the system's cc, gcc or clang (None: none on PATH)."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _compiler_version(compiler: str) -> str:
    return subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout


def _library_paths(version: str, sets: list) -> list:
    """Where the cache keeps the library built with each flag set: keyed by the source, the flags, the compiler's
    --version and the CPU (the source and the CPU read once for all the sets)."""
    source, cpu = SOURCE.read_text(), _cpu_signature()
    cache = pathlib.Path(os.environ.get("FASTHYDRA_CACHE_DIR", pathlib.Path.home() / ".cache" / "fasthydra"))
    keys = (hashlib.sha256("\n".join([source, " ".join(flags), version, cpu]).encode()) for flags in sets)
    return [cache / f"hydra_kl_rows-{key.hexdigest()[:16]}.so" for key in keys]


def _compiled(compiler: str, flags: list, version: str | None = None, path: pathlib.Path | None = None
              ) -> pathlib.Path:
    """The library built with these flags (from the cache when it is there); version: the compiler's --version,
    path: the cache's path for them (_library_paths) where the caller has it."""
    if path is None:
        path = _library_paths(_compiler_version(compiler) if version is None else version, [flags])[0]
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
        os.close(fd)
        try:
            out = subprocess.run([compiler, *flags, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True)
            if out.returncode != 0:
                raise RuntimeError(f"building {SOURCE.name} with {' '.join(flags)} failed:\n{out.stderr[-2000:]}")
            os.replace(tmp, path)  # atomic: a racing process sees the old state or the whole library
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return path


def _flag_sets(march: str | None = None) -> list:
    """The flag sets to build with, best first: each spelling of the host's instruction set (HOST_ARCH; march: that
    level only, as tests ask for x86 levels), with OpenMP and then without (Apple's clang has no OpenMP)."""
    arches = HOST_ARCH if march is None else ([f"-march={march}"],)
    return [FLAGS + arch + omp for arch in arches for omp in (OPENMP, [])]


def _build(march: str | None = None) -> ctypes.CDLL:
    """The library for this host (march None), or for another instruction-set level (tests: "x86-64-v3" builds the
    AVX2 code an AVX-512 host would never run, to check its values there). The first flag set (_flag_sets) whose
    library the cache holds is taken; else they are built in turn until one builds: a compiler that rejects a set
    pays for that once, not in every process. (A set that failed once, an OpenMP runtime installed later, is tried
    again only with another compiler version or an emptied cache.)"""
    global _built_with
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler (cc, gcc or clang) on PATH")
    version = _compiler_version(compiler)
    flag_sets = _flag_sets(march)
    sets = list(zip(flag_sets, _library_paths(version, flag_sets)))
    cached = [(flags, path) for flags, path in sets if path.exists()]
    failures = []
    for flags, path in cached[:1] or sets:
        try:
            path = _compiled(compiler, flags, version, path)
            break
        except RuntimeError as exc:
            failures.append(str(exc))
    else:
        raise RuntimeError("\n".join(failures))
    lib = ctypes.CDLL(str(path))
    i64, f32, ptr, i32 = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p, ctypes.c_int
    rows = [ptr, i64, i64, i64, i32]  # scratch, its stride per part, r0, r1, threads
    lib.hydra_kl_rows.argtypes = [ptr, i64, i64, f32, ptr, i64, i64, i64, ptr, i64, i64, f32, ptr, f32, i64, ptr, i64,
                                  f32, f32, i32, *rows]
    tile = [ptr, i64, i64, ptr, i64, i64, i64, i64, i64, i64, f32, ptr, ptr, ptr, ptr]  # + a for the stats
    lib.hydra_kl_tile_stats.argtypes = tile + [ptr, i32]
    lib.hydra_kl_tile_grad.argtypes = tile + [i32]
    lib.hydra_uncertainty_rows.argtypes = [ptr, i64, i64, i64, i64, f32, ptr, i64, ptr, ptr, ptr, *rows]
    lib.hydra_log_mean_rows.argtypes = [ptr, i64, i64, i64, i64, f32, f32, ptr, i64, *rows]
    lib.hydra_uncertainty_grad_rows.argtypes = [ptr, i64, i64, i64, i64, f32, ptr, i64, ptr, ptr, ptr, i64, i64, *rows]
    for fn in (lib.hydra_kl_rows, lib.hydra_kl_tile_stats, lib.hydra_kl_tile_grad, lib.hydra_uncertainty_rows,
               lib.hydra_log_mean_rows, lib.hydra_uncertainty_grad_rows):
        fn.restype = None
    lib.hydra_openmp.restype = i32
    lib.hydra_openmp_entry.restype = ptr
    if march is None:
        _built_with = flags
    return lib


def _torch_openmp_entry():
    """The address of omp_get_num_threads as torch's own libraries resolve it (looked up through the dependencies of
    torch._C), None where torch carries no OpenMP runtime."""
    try:
        return ctypes.cast(ctypes.CDLL(torch._C.__file__).omp_get_num_threads, ctypes.c_void_p).value
    except (OSError, AttributeError):
        return None


def _on_torch_team(lib, torch_entry=None) -> bool:
    """Whether the library's OpenMP parts run on torch's team: built with OpenMP and bound to the very runtime
    torch's libraries use (the same address of one of its functions; torch_entry: that address, for tests). A
    process may map other runtimes beside it (scikit-learn's wheels bring a renamed libgomp) and still share
    torch's team; a library bound to another runtime would keep a second team spinning on the same cores."""
    if not lib.hydra_openmp():
        return False
    theirs = _torch_openmp_entry() if torch_entry is None else torch_entry
    return theirs is not None and lib.hydra_openmp_entry() == theirs


def _library():
    global _lib, _reason, _team
    if os.environ.get("FASTHYDRA_NATIVE", "1") == "0":
        return None
    if _lib is None and _reason == "not built yet":
        with _lock:
            if _lib is None and _reason == "not built yet":
                try:
                    _lib = _build()
                    _team = not _forked and _on_torch_team(_lib)
                    _reason = "ok"
                except Exception as exc:  # no compiler, sandbox, exotic platform: use the torch ops
                    _reason = f"{type(exc).__name__}: {exc}"
                    warnings.warn(f"fasthydra: native CPU kernel unavailable, using torch ops ({_reason})",
                                  RuntimeWarning, stacklevel=3)
    return _lib


def status() -> str:
    """'ok' when the native kernel runs, else why the torch ops run instead."""
    if os.environ.get("FASTHYDRA_NATIVE", "1") == "0":
        return "disabled by FASTHYDRA_NATIVE=0"
    _library()
    return _reason


def build_flags() -> list | None:
    """The compiler flags of the library in use (e.g. ["-O3", ..., "-march=native", "-fopenmp"]: which spelling of
    the host's instruction set and whether OpenMP were taken, for a bug report), None where the torch ops run."""
    if status() != "ok":
        return None
    return list(_built_with)


def usable(s: torch.Tensor) -> bool:
    """The native kernel takes fp32 CPU rows; everything else (fp64 reference mode, CUDA) uses torch ops."""
    return s.dtype == torch.float32 and s.device.type == "cpu" and _library() is not None


def kl_rows(s: torch.Tensor, t: torch.Tensor, temperature: float, want_grad: bool, want_tgrad: bool = False, *,
            s_scale: float = 1.0, grad_out: torch.Tensor | None = None, tgrad_out: torch.Tensor | None = None,
            out_scale: float = 1.0, tgrad_scale: float | None = None):
    """Loss rows T^2 * KL, q - p and (want_tgrad) the teacher's p * ((log p - log q) - KL) for fp32 rows of
    C classes: s * s_scale the tempered student logits (s tempered already, or raw with s_scale = 1 / T), t the
    raw teacher, both (R, C) or (O, I, C) of one shape, in any memory order with unit stride along C (no copy:
    a (rows, heads, C) chunk made head-major by a batched GEMM is read as it lies). q - p comes out multiplied by
    out_scale, the teacher's gradient by tgrad_scale (None: out_scale; scaled as it is stored, so that a caller's
    T * coefficient at T < 1 applies before an unscaled gradient would pass float32's range). q - p goes to
    grad_out (fp32, contiguous, s's shape), or, without one, over s, which is then consumed (no second chunk-sized
    buffer): the returned grad is s itself. The teacher's goes to tgrad_out (same rules) or a new tensor. Returns
    (loss s.shape[:-1], grad or None, tgrad or None).

    Rows are split across torch.get_num_threads() threads (ctypes releases the GIL during the call).
    """
    temperature = float(temperature)  # (a CPU tensor temperature where tests keep one: read at no cost)
    lib = _library()
    shape = s.shape
    for name, out in (("grad_out", grad_out), ("tgrad_out", tgrad_out)):  # internal callers: a bug if not met
        assert out is None or (out.dtype == torch.float32 and out.shape == shape and out.is_contiguous()), name
    if s.dim() not in (2, 3) or s.stride(-1) != 1:  # other layouts: as one contiguous (R, C) block
        s = s.reshape(-1, shape[-1]).contiguous()
    t = t.to(torch.float32)
    if t.shape != s.shape or t.stride(-1) != 1:
        t = t.reshape(s.shape).contiguous()
    if s.dim() == 2:  # (R, C) as (R, 1, C): the same (O, inner, C) geometry as the tile kernels
        s, t = s.unsqueeze(1), t.unsqueeze(1)
    head, r, c = _tile_geometry(s, t)
    loss = torch.empty(s.shape[:-1], dtype=torch.float32)
    grad = None  # with grad_out None: s, the kernel reading each row before it writes its q - p there
    if want_grad:
        grad = s if grad_out is None else grad_out.view(s.shape)
    tgrad = None
    if want_tgrad:
        tgrad = torch.empty(s.shape, dtype=torch.float32) if tgrad_out is None else tgrad_out.view(s.shape)
    if r > 0:
        g = (None, 0, 0) if grad is None else (grad.data_ptr(), grad.stride(0), grad.stride(1))
        h_scale = out_scale if tgrad_scale is None else tgrad_scale
        args = (*head[:3], s_scale, *head[3:], *g, out_scale, None if tgrad is None else tgrad.data_ptr(), h_scale,
                c if want_tgrad else 0, loss.data_ptr(), c, 1.0 / temperature, temperature * temperature,
                int(want_grad))
        _over_rows(lambda *rows: lib.hydra_kl_rows(*args, *rows), r, scratch=2 * c)  # two exponential rows
    return (loss.view(shape[:-1]), None if grad is None else grad.view(shape),
            None if tgrad is None else tgrad.view(shape))


def _over_rows(call, r: int, scratch: int | None = None) -> None:
    """call(scratch pointer, its stride per part, r0, r1, threads) over rows [0, r) split into up to
    torch.get_num_threads() parts, each with `scratch` floats of its own (None: no scratch): one call whose
    parts run on the OpenMP team (_team), else one call per part on the Python pool, each told threads = 1
    (ctypes releases the GIL during each call). The stride is a multiple of SCRATCH_ALIGN floats."""
    global _pool
    workers = max(1, min(torch.get_num_threads(), r // MIN_ROWS_PER_THREAD))
    ld = -(-max(scratch or 0, 1) // SCRATCH_ALIGN) * SCRATCH_ALIGN
    buffer = None if scratch is None else torch.empty(workers, ld, dtype=torch.float32)
    base = None if buffer is None else buffer.data_ptr()
    if workers == 1 or _team:
        call(base, ld, 0, r, workers)
        return
    bounds = [r * i // workers for i in range(workers + 1)]
    if _pool is None or _pool._max_workers < workers:
        _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fasthydra-kl")
    futures = [_pool.submit(call, None if base is None else base + 4 * ld * i, ld, bounds[i], bounds[i + 1], 1)
               for i in range(workers)]
    for f in futures:
        f.result()


def tile_usable(s: torch.Tensor, t: torch.Tensor) -> bool:
    """The class-tiled kernels take an fp32 (M, rows, w) CPU tile and a teacher view of the same shape,
    fp32, unit stride along the classes."""
    return usable(s) and t.dtype == torch.float32 and t.stride(-1) == 1 and s.stride(-1) == 1


def tile_stats_init(rows: int) -> tuple:
    """Per-row statistics (m_s, d_s, m_t, d_u, a) before the first tile: maxima -inf, sums 0 (`a` in A_SCALE units,
    as hydra_kl.py's kl_from_sums takes it)."""
    inf = torch.full((rows,), float("-inf"), dtype=torch.float32)
    return inf, torch.zeros(rows), inf.clone(), torch.zeros(rows), torch.zeros(rows)


def _tile_geometry(s: torch.Tensor, t: torch.Tensor):
    """(pointers, strides and inner size of two (O, inner, C) views, unit stride along C), rows, C."""
    m, inner, w = s.shape
    return (s.data_ptr(), s.stride(0), s.stride(1), t.data_ptr(), t.stride(0), t.stride(1), inner), m * inner, w


def tile_stats(s: torch.Tensor, t: torch.Tensor, stats: tuple, temperature: float) -> None:
    """Pass 1 of the class-tiled mode: folds one (M, rows, w) tile, s tempered student logits and t the raw
    teacher (views of one shape), into stats (tile_stats_init's five (M * rows,) arrays, in place)."""
    temperature = float(temperature)  # (a CPU tensor temperature where tests keep one: read at no cost)
    lib = _library()
    head, r, w = _tile_geometry(s, t)
    ptrs = [x.data_ptr() for x in stats]
    _over_rows(lambda _, __, r0, r1, k: lib.hydra_kl_tile_stats(*head, r0, r1, w, 1.0 / temperature, *ptrs, k), r)


def tile_grad(s: torch.Tensor, t: torch.Tensor, m_s, log_d_s, m_t, log_d_u, temperature: float) -> torch.Tensor:
    """Pass 2: s (a recomputed tempered tile, contiguous) becomes q - p in place, from pass 1's maxima and
    log-normalisers (each (M * rows,))."""
    temperature = float(temperature)  # (a CPU tensor temperature where tests keep one: read at no cost)
    lib = _library()
    head, r, w = _tile_geometry(s, t)
    ptrs = [x.data_ptr() for x in (m_s, log_d_s, m_t, log_d_u)]
    _over_rows(lambda _, __, r0, r1, k: lib.hydra_kl_tile_grad(*head, r0, r1, w, 1.0 / temperature, *ptrs, k), r)
    return s


def uncertainty_rows(logits: torch.Tensor, temperature: float):
    """(probs (B, C), total, aleatoric, epistemic (B,)) of fp32 (B, M, C) CPU logits (unit stride along C),
    one C sweep set per row: softmax per head, the mixture, the entropies (csrc: hydra_uncertainty_rows)."""
    temperature = float(temperature)  # (a CPU tensor temperature where tests keep one: read at no cost)
    lib = _library()
    b, m, c = logits.shape
    probs = torch.empty(b, c, dtype=torch.float32)
    total, aleatoric, epistemic = (torch.empty(b, dtype=torch.float32) for _ in range(3))
    head = (logits.data_ptr(), logits.stride(0), logits.stride(1), m, c, 1.0 / temperature, probs.data_ptr(), c,
            total.data_ptr(), aleatoric.data_ptr(), epistemic.data_ptr())
    if b > 0:
        _over_rows(lambda *rows: lib.hydra_uncertainty_rows(*head, *rows), b, scratch=c)  # a row of exponentials
    return probs, total, aleatoric, epistemic


def usable_members(t: torch.Tensor) -> bool:
    """log_mean_rows takes CPU member logits in fp32, or in 16 bits (read into fp32 first, as the torch ops do)."""
    return t.dtype in (torch.float32, torch.float16, torch.bfloat16) and t.device.type == "cpu" and \
        _library() is not None


def log_mean_rows(teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """The Hinton target T log mean_m softmax(t_m / T), (B, C) fp32, of (B, M, C) CPU member logits (usable_members;
    any layout: copied where they are 16-bit or the classes are not unit-stride), -inf where every member masks a
    class: one C sweep set per row (csrc: hydra_log_mean_rows, the mixture of ``uncertainty_rows``, then one
    logarithm per class). No gradient: for a frozen teacher."""
    if teacher.dtype != torch.float32 or teacher.stride(-1) != 1:
        teacher = teacher.to(torch.float32).contiguous()
    lib = _library()
    b, m, c = teacher.shape
    out = torch.empty(b, c, dtype=torch.float32)
    head = (teacher.data_ptr(), teacher.stride(0), teacher.stride(1), m, c, 1.0 / temperature, temperature,
            out.data_ptr(), c)
    if b > 0:
        _over_rows(lambda *rows: lib.hydra_log_mean_rows(*head, *rows), b, scratch=c)  # a row of exponentials
    return out


def uncertainty_grad_rows(logits: torch.Tensor, temperature: float, g_probs, on_total, on_heads) -> torch.Tensor:
    """dL/dz (B, M, C) fp32 of fp32 (B, M, C) CPU logits (unit stride along C) from the upstream gradient of the
    mixture g_probs (B, C) and the per-row coefficients on_total = g_total + g_epistemic and on_heads =
    g_aleatoric - g_epistemic (B,), each None when absent (csrc: hydra_uncertainty_grad_rows: one exponential per
    element, each row's heads in cache)."""
    temperature = float(temperature)  # (a CPU tensor temperature where tests keep one: read at no cost)
    lib = _library()
    b, m, c = logits.shape
    dz = torch.empty(b, m, c, dtype=torch.float32)

    def ptr(t):
        return None if t is None else t.data_ptr()

    g_probs = None if g_probs is None else g_probs.to(torch.float32).contiguous()
    on_total, on_heads = (None if t is None else t.to(torch.float32).contiguous() for t in (on_total, on_heads))
    head = (logits.data_ptr(), logits.stride(0), logits.stride(1), m, c, 1.0 / temperature, ptr(g_probs), c,
            ptr(on_total), ptr(on_heads), dz.data_ptr(), m * c, c)
    if b > 0 and c > 0:  # scratch: rows of p, the mixture and V, each head's reference and normaliser
        _over_rows(lambda *rows: lib.hydra_uncertainty_grad_rows(*head, *rows), b, scratch=3 * c + 2 * m)
    return dz
