// placeholder replaced below
#include <torch/library.h>
