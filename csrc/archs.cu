// archs.cu - pyops_cuda_archs() (pyops/common.h): the GPU architectures libpyops was built for.
// Torch-free, host-only. Compiled with the same -gencode flags as every other csrc/*.cu (setup.py
// and CMakeLists.txt build one list of sources for one list of archs), so nvcc's
// __CUDA_ARCH_LIST__ here (e.g. "900,1000") is the library's list; it becomes "90;100".
#include "pyops/common.h"

#define PYOPS_STR2_(...) #__VA_ARGS__
#define PYOPS_STR_(...) PYOPS_STR2_(__VA_ARGS__)

namespace {

#ifdef __CUDA_ARCH_LIST__
constexpr char kArchList[] = PYOPS_STR_(__CUDA_ARCH_LIST__);
#else
constexpr char kArchList[] = "";
#endif

// Each decimal number n of kArchList (separated by anything else) becomes n / 10, joined by ';'.
struct ArchString {
  char text[sizeof(kArchList) + 1] = {};
  ArchString() {
    int out = 0;
    long num = -1;
    for (unsigned i = 0; i < sizeof(kArchList); ++i) {  // includes the terminating NUL
      const char ch = kArchList[i];
      if (ch >= '0' && ch <= '9') {
        num = (num < 0 ? 0 : num * 10) + (ch - '0');
        continue;
      }
      if (num < 0) continue;
      char digits[24];
      int nd = 0;
      for (long v = num / 10; nd == 0 || v > 0; v /= 10)
        digits[nd++] = static_cast<char>('0' + v % 10);
      if (out > 0) text[out++] = ';';
      while (nd > 0) text[out++] = digits[--nd];
      num = -1;
    }
    text[out] = '\0';
  }
};

}  // namespace

extern "C" const char* pyops_cuda_archs(void) {
  static const ArchString archs;  // built once (thread-safe static init)
  return archs.text;
}
