// Standalone driver of the emulated spinal kernels for the sanitizer runs (.ci/cuda_checks.sh): no torch,
// raw buffers, tiny shapes. Built twice:
//   -DSIMT_OS_THREADS -fsanitize=thread                  (every CUDA thread an OS thread: data races)
//   -DSIMT_FIBER_UCONTEXT -fsanitize=address,undefined   (out-of-bounds and undefined behaviour)
// It runs forward and backward (all gradients) for a few variants and compares the forward with a naive
// loop implementation in double. `--planted-race` instead runs a kernel with a deliberate lost update, which
// ThreadSanitizer must report (the script checks that it does).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "cuda/spinal_launch.h"
#include "planted.h"

namespace {

using Act = spinal_ops::Activation;
using spinal_ops::cuda::acc_t;
using spinal_ops::cuda::BwdParams;
using spinal_ops::cuda::convert;
using spinal_ops::cuda::FwdParams;

struct Config {
  int B, D, K, w, L, out;
  Act act;
  double slope;
  bool shared, head, bias;  // shared: the weight slots (0, 1, 1, ..., 1); otherwise (0, 1, ..., L-1)
  const char* name;
};

double act_ref(Act a, double z, double slope) {
  switch (a) {
    case Act::kRelu: return z > 0 ? z : 0;
    case Act::kLeakyRelu: return z > 0 ? z : z * slope;
    case Act::kTanh: return std::tanh(z);
    case Act::kSigmoid: return 1 / (1 + std::exp(-z));
    case Act::kIdentity: return z;
    case Act::kGelu: return 0.5 * z * (1 + std::erf(z / std::sqrt(2.0)));
    case Act::kSilu: return z / (1 + std::exp(-z));
  }
  return z;
}

void check_launch(simt::Status s, const char* name) {
  if (!simt::ok(s)) {
    std::fprintf(stderr, "launch of %s failed\n", name);
    std::exit(1);
  }
}

template <typename T>
std::vector<T> random_vec(size_t n, std::mt19937& rng, double scale) {
  std::uniform_real_distribution<double> u(-scale, scale);
  std::vector<T> v(n);
  for (auto& e : v) e = convert<T>(static_cast<float>(u(rng)));
  return v;
}

template <typename T>
double to_d(T v) {
  return static_cast<double>(convert<float>(v));
}
template <>
double to_d<double>(double v) {
  return v;
}

template <typename T>
bool run(const Config& cfg, double tol) {
  std::mt19937 rng(42);
  const int c = static_cast<int>(std::lround(static_cast<double>(cfg.D) / cfg.K));
  const int Lw = cfg.L * cfg.w;
  std::vector<int> starts(cfg.L), slots(cfg.L);
  for (int i = 0; i < cfg.L; ++i) starts[i] = (i * c) % cfg.D, slots[i] = cfg.shared ? std::min(i, 1) : i;
  const int Lx = *std::max_element(slots.begin(), slots.end()) + 1, Lh = Lx - 1;
  auto x = random_vec<T>(size_t(cfg.B) * cfg.D, rng, 1.0);
  auto wx = random_vec<T>(size_t(Lx) * cfg.w * c, rng, 1.0 / std::sqrt(c));
  auto wh = random_vec<T>(size_t(std::max(Lh, 1)) * cfg.w * cfg.w, rng, 1.0 / std::sqrt(c + cfg.w));
  auto b = random_vec<T>(size_t(Lx) * cfg.w, rng, 0.5);
  auto wo = random_vec<T>(size_t(cfg.out) * Lw, rng, 1.0 / std::sqrt(Lw));
  auto bo = random_vec<T>(size_t(cfg.out), rng, 0.5);
  std::vector<T> H(size_t(cfg.B) * Lw), y(size_t(cfg.B) * cfg.out);
  std::vector<acc_t<T>> y_ws(size_t(cfg.B) * cfg.out);

  FwdParams<T> p{};
  p.x = x.data(), p.wx = wx.data(), p.wh = wh.data(), p.bias = cfg.bias ? b.data() : nullptr;
  p.wo = cfg.head ? wo.data() : nullptr, p.bo = cfg.head && cfg.bias ? bo.data() : nullptr;
  p.starts = starts.data(), p.slots = slots.data(), p.h_all = H.data(), p.y = cfg.head ? y.data() : nullptr;
  p.y_ws = spinal_ops::cuda::forward_needs_y_workspace<T>(cfg.out, cfg.head) ? y_ws.data() : nullptr;
  p.rows = cfg.B, p.in_features = cfg.D, p.layers = cfg.L, p.width = cfg.w, p.chunk = c, p.out = cfg.out;
  p.slope = static_cast<acc_t<T>>(cfg.slope);
  spinal_ops::cuda::launch_forward(p, cfg.act, {}, nullptr, check_launch);

  // Naive forward in double.
  double worst = 0;
  std::vector<double> h(cfg.w), hp(cfg.w), yr(cfg.out);
  for (int r = 0; r < cfg.B; ++r) {
    std::fill(yr.begin(), yr.end(), 0.0);
    for (int i = 0; i < cfg.L; ++i) {
      const int xs = slots[i], hs = slots[i] - 1;
      for (int n = 0; n < cfg.w; ++n) {
        double z = cfg.bias ? to_d(b[xs * cfg.w + n]) : 0;
        for (int k = 0; k < c; ++k) z += to_d(x[r * cfg.D + (starts[i] + k) % cfg.D]) * to_d(wx[(xs * cfg.w + n) * c + k]);
        for (int k = 0; i > 0 && k < cfg.w; ++k) z += hp[k] * to_d(wh[(hs * cfg.w + n) * cfg.w + k]);
        h[n] = act_ref(cfg.act, z, cfg.slope);
        worst = std::max(worst, std::abs(h[n] - to_d(H[size_t(r) * Lw + i * cfg.w + n])));
      }
      for (int o = 0; o < cfg.out; ++o)
        for (int n = 0; n < cfg.w; ++n) yr[o] += h[n] * to_d(wo[size_t(o) * Lw + i * cfg.w + n]);
      hp = h;
    }
    for (int o = 0; cfg.head && o < cfg.out; ++o) {
      const double ref = yr[o] + (cfg.bias ? to_d(bo[o]) : 0);
      worst = std::max(worst, std::abs(ref - to_d(y[size_t(r) * cfg.out + o])));
    }
  }

  // Backward, every gradient.
  auto gy = random_vec<T>(size_t(cfg.B) * cfg.out, rng, 1.0);
  auto gh = random_vec<T>(size_t(cfg.B) * Lw, rng, 1.0);
  std::vector<acc_t<T>> dz(size_t(cfg.B) * cfg.L * cfg.w), dx_acc(size_t(cfg.B) * cfg.D);
  std::vector<T> dx(x.size()), dwx(wx.size()), dwh(wh.size()), db(b.size()), dwo(wo.size()), dbo(bo.size());
  BwdParams<T> q{};
  q.gy = cfg.head ? gy.data() : nullptr, q.gh = gh.data(), q.x = x.data(), q.h_all = H.data();
  q.wx = wx.data(), q.wh = wh.data(), q.bias = p.bias, q.wo = p.wo, q.starts = starts.data(), q.slots = slots.data();
  q.dz = dz.data(), q.dx_acc = dx_acc.data(), q.dx = dx.data(), q.dwx = dwx.data();
  q.dwh = Lh > 0 ? dwh.data() : nullptr, q.db = cfg.bias ? db.data() : nullptr;
  q.dwo = cfg.head ? dwo.data() : nullptr, q.dbo = cfg.head ? dbo.data() : nullptr;
  q.rows = cfg.B, q.in_features = cfg.D, q.layers = cfg.L, q.width = cfg.w, q.chunk = c, q.out = cfg.out;
  q.x_slots = Lx, q.h_slots = Lh, q.slope = p.slope;
  std::vector<acc_t<T>> wpart(static_cast<size_t>(spinal_ops::cuda::weight_partial_elements(q)));
  q.wpart = wpart.empty() ? nullptr : wpart.data();
  spinal_ops::cuda::launch_backward(q, cfg.act, nullptr, check_launch);
  double grad_sum = 0;
  for (T v : dx) grad_sum += to_d(v);
  for (T v : dwx) grad_sum += to_d(v);

  const bool good = worst <= tol && std::isfinite(grad_sum);
  std::printf("%-40s forward max error %.3e (tolerance %.1e), gradients %s\n", cfg.name, worst, tol,
              std::isfinite(grad_sum) ? "finite" : "NOT FINITE");
  return good;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1 && std::strcmp(argv[1], "--planted-race") == 0) {
    float value = 0;
    planted::run_lost_update(&value);
    std::printf("planted lost update: %g (128 without the race)\n", value);
    return 0;
  }
  bool ok = true;
  for (int schedule = 0; schedule < 3; ++schedule) {
    simt::set_schedule(static_cast<simt::Schedule>(schedule), 7);
    ok &= run<float>({19, 13, 3, 5, 3, 4, Act::kRelu, 0.01, false, true, true, "f32 relu wrap head"}, 1e-5);
    ok &= run<double>({5, 12, 3, 70, 2, 3, Act::kGelu, 0.01, false, true, true, "f64 gelu w=70 general"}, 1e-12);
    ok &= run<double>({3, 10, 2, 4, 4, 0, Act::kLeakyRelu, -0.2, true, false, false, "f64 leaky<0 shared hidden"},
                      1e-12);
    ok &= run<__half>({17, 40, 2, 20, 3, 5, Act::kSilu, 0.01, false, true, true, "f16 silu wmma"}, 2e-2);
    ok &= run<__nv_bfloat16>({4, 9, 2, 6, 2, 70, Act::kSigmoid, 0.01, true, true, true, "bf16 sigmoid shared"}, 8e-2);
    ok &= run<float>({130, 6, 2, 4, 2, 3, Act::kTanh, 0.01, true, true, true, "f32 tanh B=130 split weights"}, 1e-5);
  }
  std::printf("%s\n", ok ? "sanitizer driver: all variants correct" : "sanitizer driver: FAILED");
  return ok ? 0 : 1;
}
