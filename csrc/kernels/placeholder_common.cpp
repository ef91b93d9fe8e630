// Keeps the kernel library non-empty until the first kernel family lands.
namespace edgefed { int kernels_placeholder() { return 0; } }
