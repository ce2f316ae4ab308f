"""Build of cnnlstm_ext._C.

The CUDA kernels are built when torch has CUDA and a CUDA toolkit is found, whether or not a GPU
is visible (CNNLSTM_EXT_CUDA=auto|0|1); without a visible GPU and TORCH_CUDA_ARCH_LIST, for
sm_80, sm_86, sm_89 and sm_90 plus PTX (DEFAULT_CUDA_ARCH_LIST). Two traps of GPU-less build
machines are handled here: `nvcc` on PATH may be a wrapper script (so the toolkit root is
resolved explicitly, before torch.utils.cpp_extension reads it), and the cuBLAS/cuSPARSE headers
may live only in the installed `nvidia` wheels (site-packages/nvidia/cu13/include), which is
added to the include path.
The LSTM's TF32 GEMMs call cuBLAS directly, so the extension links the libcublas torch loads (the
wheel's, else the toolkit's).
"""
import glob
import os
import shutil
import subprocess
import sys

from setuptools import setup


def _resolve_cuda_home():
    """Environment first, then the conventional toolkit location, then nvcc's real location."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and os.path.exists(os.path.join(root, "bin", "nvcc")):
            return root
    for root in ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True):
        if os.path.exists(os.path.join(root, "bin", "nvcc")):
            return root
    nvcc = shutil.which("nvcc")
    if nvcc:
        # A wrapper script (`exec /usr/local/cuda-13.0/bin/nvcc "$@"`) hides the real root.
        try:
            with open(nvcc, "rb") as f:
                head = f.read(4096).decode("utf-8", "replace")
            for token in head.split():
                if token.endswith("/bin/nvcc") and os.path.exists(token):
                    return os.path.dirname(os.path.dirname(token))
        except OSError:
            pass
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return None


_CUDA_HOME = _resolve_cuda_home()
if _CUDA_HOME:
    os.environ["CUDA_HOME"] = _CUDA_HOME

import torch  # noqa: E402  (after CUDA_HOME is set)
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
# TORCH_CUDA_ARCH_LIST of a build that sees no GPU (a user's TORCH_CUDA_ARCH_LIST wins; with a
# visible GPU torch builds for that GPU): A100 (8.0), A10/RTX 30xx (8.6), L4/RTX 40xx (8.9),
# H100/H200 (9.0), and PTX of 9.0 that the driver compiles for newer cards.
DEFAULT_CUDA_ARCH_LIST = "8.0;8.6;8.9;9.0+PTX"


def _want_cuda():
    mode = os.environ.get("CNNLSTM_EXT_CUDA", "auto").lower()
    if mode in ("0", "off", "false", "no"):
        return False
    available = torch.version.cuda is not None and _CUDA_HOME is not None
    if mode in ("1", "on", "true", "yes"):
        if not available:
            sys.exit("CNNLSTM_EXT_CUDA=1 but torch has no CUDA (torch.version.cuda=%r) or no CUDA "
                     "toolkit was found (CUDA_HOME=%r)" % (torch.version.cuda, _CUDA_HOME))
        return True
    return available


def _wheel_cuda_includes():
    """Headers shipped by the nvidia-* wheels torch depends on (cuBLAS, cuSPARSE, ...)."""
    dirs = []
    for base in [os.path.dirname(os.path.dirname(torch.__file__))] + sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/cu12/include"):
            d = os.path.join(base, sub)
            if os.path.isdir(d) and d not in dirs:
                dirs.append(d)
        for d in sorted(glob.glob(os.path.join(base, "nvidia", "*", "include"))):
            if os.path.isdir(d) and d not in dirs:
                dirs.append(d)
    return dirs


def _cublas_library():
    """libcublas to link: the nvidia wheel's that torch itself loads, else the toolkit's."""
    candidates = []
    for base in [os.path.dirname(os.path.dirname(torch.__file__))] + sys.path:
        for sub in ("nvidia/cu13/lib", "nvidia/cu12/lib", "nvidia/cublas/lib"):
            candidates += sorted(glob.glob(os.path.join(base, sub, "libcublas.so*")))
    if _CUDA_HOME:
        candidates += [os.path.join(_CUDA_HOME, d, "libcublas.so") for d in ("lib64", "lib")]
    for path in candidates:
        if os.path.isfile(path):
            return path
    sys.exit("cnnlstm_ext: no libcublas found (looked in the nvidia wheels next to torch and in "
             "CUDA_HOME=%r); install torch's CUDA wheels or a CUDA toolkit, or build without the "
             "CUDA kernels (CNNLSTM_EXT_CUDA=0)" % (_CUDA_HOME,))


def _extension():
    use_cuda = _want_cuda()
    # csrc/*.cpp (schemas, options, CPU capability) and each op's folder: CPU kernels, autograd.
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*/*.cpp"))
    # at::parallel_for is inline OpenMP: without -fopenmp it compiles to a serial loop here. The
    # extension then shares the OpenMP runtime torch has loaded (same soname) and its threads.
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    cxx = ["-O3"] + openmp
    include_dirs = [os.path.join(HERE, "csrc")]
    if not use_cuda:
        print("cnnlstm_ext: building the CPU kernels only")
        return CppExtension("cnnlstm_ext._C", sources, include_dirs=include_dirs,
                            extra_compile_args={"cxx": cxx}, extra_link_args=openmp,
                            py_limited_api=True)
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        visible = False
        try:
            visible = torch.cuda.is_available()
        except Exception:
            pass
        if not visible:
            # No GPU to build for: the cards people train on, and PTX for newer ones.
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
    print("cnnlstm_ext: building CPU and CUDA kernels (CUDA_HOME=%s, arch=%s)"
          % (_CUDA_HOME, os.environ.get("TORCH_CUDA_ARCH_LIST", "from visible GPU")))
    sources += sorted(glob.glob("csrc/*/*.cu"))
    include_dirs += _wheel_cuda_includes()
    nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
    cublas = _cublas_library()
    print("cnnlstm_ext: linking %s" % cublas)
    return CUDAExtension("cnnlstm_ext._C", sources, include_dirs=include_dirs,
                         extra_compile_args={"cxx": cxx + ["-DCNNLSTM_EXT_WITH_CUDA"],
                                             "nvcc": nvcc + ["-DCNNLSTM_EXT_WITH_CUDA"]},
                         extra_link_args=[cublas] + openmp, py_limited_api=True)


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
