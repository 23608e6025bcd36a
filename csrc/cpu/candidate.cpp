// CPU kernels of pbp_fast::candidate_pass: one candidate's forward, its correlation statistics,
// and its weight gradients, for one batch; and of candidate_objective / candidate_update, the
// per-batch bookkeeping of its running statistics (one call each instead of ~60 small ops).
//
//   a = conv(x; W_c, b_c) + sum_j kappa_j s_j,  v = sigmoid(a)
//   stats_c += (v, e, v e, e e, v v)                  (per output channel, float64 sums)
//   dL/da = -sign_c (e - mean_e_c) / n * v (1 - v)    -> grad b_c, grad kappa_j, grad W_c
//
// Depthwise candidates run a direct kernel (conv, epilogue and weight gradient per output row
// of a plane, or per output pixel in NHWC); 1x1 candidates GEMMs for a and for grad W (common.h);
// others an ATen conv for a and for grad W.
// candidate_epilogue is the epilogue alone, on a pre-activation the caller computed (a
// candidate with a BatchNorm: pbp_fast/ops/candidate.py normalises the conv's output).
#include "common.h"

#include <torch/library.h>

namespace pbp {
namespace {

// Accumulator: rows v, e, ve, ee, vv (kStats), grad_bias, grad_cascade[D] (Cout each), then
// grad W taps.
constexpr int64_t kStats = 5;
struct CandAcc {
  int64_t D, Cout;
  int64_t stat(int64_t r) const { return r * Cout; }
  int64_t bias() const { return kStats * Cout; }
  int64_t casc(int64_t j) const { return (kStats + 1 + j) * Cout; }
  int64_t taps() const { return (kStats + 1 + D) * Cout; }
};

// One line: a (pre-activation without cascade) is overwritten with dL/da; the sums go to acc
// (float64, or T partial sums).
template <bool CH_INNER, typename T, typename A>
PBP_INLINE void cand_line(int64_t L, int64_t D, int64_t Cout, T* a, const T* const* s,
                          const T* casc, const T* e, const T* mean_e, const T* sign, T inv_n,
                          A* acc, const CandAcc& ix) {
  for (int64_t j = 0; j < D; ++j) {
    const T* kap = casc + j * Cout;
    const T* sj = s[j];
    for (int64_t i = 0; i < L; ++i) a[i] = a[i] + param<CH_INNER>(kap, i) * sj[i];
  }
  // One simple loop per sum (one accumulator stream each): a single loop writing all five
  // sums is left scalar by the compiler, which cannot rule out their aliasing a and e.
  sigmoid_line(L, (const T*)a, a);  // v
  const T* v = a;
  acc_add<CH_INNER>(acc + ix.stat(0), L, v, (const T*)nullptr);
  acc_add<CH_INNER>(acc + ix.stat(1), L, e, (const T*)nullptr);
  acc_add<CH_INNER>(acc + ix.stat(2), L, v, e);
  acc_add<CH_INNER>(acc + ix.stat(3), L, e, e);
  acc_add<CH_INNER>(acc + ix.stat(4), L, v, v);
  for (int64_t i = 0; i < L; ++i)
    a[i] = -param<CH_INNER>(sign, i) * (e[i] - param<CH_INNER>(mean_e, i)) * inv_n * a[i] *
           (T(1) - a[i]);
  acc_add<CH_INNER>(acc + ix.bias(), L, (const T*)a, (const T*)nullptr);
  for (int64_t j = 0; j < D; ++j) acc_add<CH_INNER>(acc + ix.casc(j), L, (const T*)a, s[j]);
}

template <typename T>
struct Args {
  const T *x, *w, *b, *casc, *e, *mean_e, *sign;
  std::vector<const T*> s;  // D stacked activations, layout of e
  T inv_n;
};

template <typename T>
std::vector<double> dw_candidate(const Geom& g, const Args<T>& p) {
  const int64_t D = (int64_t)p.s.size(), C = g.Cout, KK = g.KH * g.KW, HW = g.HW();
  const CandAcc ix{D, C};
  const int64_t size = ix.taps() + C * KK;
  const bool cl = g.channels_last;
  return chunked_sum(g.N, size, HW, [&](int64_t n0, int64_t n1, double* acc) {
    std::vector<T> a(cl ? kPixBlock * C : g.Wo);
    std::vector<const T*> sl(D);
    std::vector<int64_t> xoff(KK), woff(KK);
    Partial<T> part(cl ? size : 0);  // NHWC: sums over about kRun pixels in T
    int64_t run = 0;
    for (int64_t n = n0; n < n1; ++n) {
      if (!cl) {
        for (int64_t c = 0; c < C; ++c) {
          const T* xp = p.x + (n * C + c) * g.H * g.W;
          const T* wc = p.w + c * KK;
          for (int64_t oh = 0; oh < g.Ho; ++oh) {
            dw_row(g, oh, xp, wc, p.b ? p.b[c] : T(0), a.data());
            const int64_t o = (n * C + c) * HW + oh * g.Wo;
            for (int64_t k = 0; k < D; ++k) sl[k] = p.s[k] + o;
            cand_line<false>(g.Wo, D, C, a.data(), sl.data(), p.casc + c, p.e + o,
                             p.mean_e + c, p.sign + c, p.inv_n, acc + c, ix);
            for_row_taps(g, oh, xp, [&](int64_t tap, int64_t, const T* xo, int64_t lo,
                                        int64_t hi) {
              acc[ix.taps() + c * KK + tap] +=
                  double(dot(hi - lo, a.data() + lo, xo + lo * g.SW, g.SW));
            });
          }
        }
        continue;
      }
      for (int64_t oh = 0; oh < g.Ho; ++oh) {
        for_pixel_blocks(g, n, oh, xoff.data(), woff.data(), [&](int64_t ow, auto Pc,
                                                                 int64_t nt) {
          constexpr int64_t P = decltype(Pc)::value;
          if (run >= kRun) {
            part.flush(acc);
            run = 0;
          }
          run += P;
          const DwTaps<T> tp{p.x, p.w, xoff.data(), woff.data(), nt, g.SW * C,
                              dw_row3(g)};
          dw_pixels<P>(tp, p.b, C, a.data());
          for (int64_t q = 0; q < P; ++q) {
            const int64_t o = (n * HW + oh * g.Wo + ow + q) * C;
            for (int64_t k = 0; k < D; ++k) sl[k] = p.s[k] + o;
            cand_line<true>(C, D, C, a.data() + q * C, sl.data(), p.casc, p.e + o, p.mean_e,
                            p.sign, p.inv_n, part.data(), ix);
          }
          dw_tap_grads<P>(tp, a.data(), C, part.data() + ix.taps());
        });
      }
    }
    part.flush(acc);
  });
}


// General convs: `a` is the conv output (layout of e); overwritten with dL/da.
template <typename T>
std::vector<double> candidate_epilogue(const Geom& g, T* a, const Args<T>& p) {
  const int64_t D = (int64_t)p.s.size(), C = g.Cout, HW = g.HW();
  const CandAcc ix{D, C};
  const bool cl = channel_lines(g);
  return chunked_sum(cl ? g.N * HW : g.N, ix.taps(), cl ? 1 : HW, [&](int64_t l0, int64_t l1,
                                                                      double* acc) {
    std::vector<const T*> sl(D);
    Partial<T> part(cl ? ix.taps() : 0);  // NHWC: sums over kRun pixels in T
    for (int64_t l = l0; l < l1; ++l) {
      if (cl && (l - l0) % kRun == 0) part.flush(acc);
      for (int64_t c = 0; c < (cl ? 1 : C); ++c) {
        const int64_t o = cl ? l * C : (l * C + c) * HW;
        for (int64_t k = 0; k < D; ++k) sl[k] = p.s[k] + o;
        if (cl)
          cand_line<true>(C, D, C, a + o, sl.data(), p.casc, p.e + o, p.mean_e, p.sign, p.inv_n,
                          part.data(), ix);
        else
          cand_line<false>(HW, D, C, a + o, sl.data(), p.casc + c, p.e + o, p.mean_e + c,
                           p.sign + c, p.inv_n, acc + c, ix);
      }
    }
    if (cl) part.flush(acc);
  });
}


// The tensors behind Args: e, s in the layout `fmt`, the per-channel ones contiguous.
struct CandInputs {
  int64_t D;
  at::Tensor e, mean_e, sign, cascade;
  std::vector<at::Tensor> s;
  CandInputs(const std::optional<at::Tensor>& cascade_, const std::optional<at::Tensor>& s_,
             const at::Tensor& e_, const at::Tensor& mean_e_, const at::Tensor& sign_,
             at::MemoryFormat fmt)
      : D(cascade_.has_value() ? cascade_->size(0) : 0),
        e(e_.contiguous(fmt)),
        mean_e(mean_e_.contiguous()),
        sign(sign_.contiguous()),
        cascade(D ? cascade_->contiguous() : at::Tensor()) {
    for (int64_t k = 0; k < D; ++k) s.push_back((*s_)[k].contiguous(fmt));
  }
  template <typename T>
  Args<T> args(const Geom& g) const {
    Args<T> p{nullptr, nullptr, nullptr, D ? cascade.data_ptr<T>() : nullptr, e.data_ptr<T>(),
              mean_e.data_ptr<T>(), sign.data_ptr<T>(), {},
              T(1) / T(std::max<int64_t>(1, g.N * g.HW()))};
    for (auto& t : s) p.s.push_back(t.data_ptr<T>());
    return p;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> candidate_cpu(
    const at::Tensor& x_, const at::Tensor& weight, const std::optional<at::Tensor>& bias_,
    const std::optional<at::Tensor>& cascade_, const std::optional<at::Tensor>& s_,
    const at::Tensor& e_, const at::Tensor& mean_e_, const at::Tensor& sign_,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // ATen calls inside are not recorded
  const Geom g = make_geom(x_, weight.unsqueeze(0), stride, padding, dilation, groups);
  const auto fmt = format_of(g.channels_last);
  const int64_t C = g.Cout, KK = g.KH * g.KW;
  const CandInputs in(cascade_, s_, e_, mean_e_, sign_, fmt);
  const int64_t D = in.D;
  auto x = x_.contiguous(fmt);
  auto bias = bias_.has_value() ? bias_->contiguous() : at::Tensor();
  auto opt = x.options();
  const CandAcc ix{D, C};
  std::vector<double> acc;
  at::Tensor gw;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "candidate_pass", [&] {
    using T = scalar_t;
    Args<T> p = in.args<T>(g);
    p.x = x.data_ptr<T>();
    p.b = bias.defined() ? bias.data_ptr<T>() : nullptr;
    if (is_depthwise(g)) {
      auto wt = g.channels_last ? weight.reshape({C, KK}).t().contiguous() : weight.contiguous();
      p.w = wt.data_ptr<T>();
      acc = dw_candidate<T>(g, p);
      const int64_t off = ix.taps();
      auto t = at::from_blob(acc.data() + off, {C * KK}, at::kDouble).to(opt.dtype()).clone();
      gw = (g.channels_last ? t.reshape({KK, C}).t() : t.reshape({C, KK}))
               .reshape(weight.sizes()).contiguous();
    } else if (is_pointwise(g)) {  // GEMMs (no oneDNN primitive per call for small shapes)
      auto a = pw_conv(g, x, weight, bias).contiguous(fmt);
      acc = candidate_epilogue<T>(g, a.data_ptr<T>(), p);
      gw = pw_grad_weight(g, a, x).view(weight.sizes());
    } else {
      auto a = at::convolution(x, weight, bias.defined() ? std::optional<at::Tensor>(bias)
                                                         : std::nullopt,
                               stride, padding, dilation, false, {0, 0}, groups)
                   .contiguous(fmt);
      acc = candidate_epilogue<T>(g, a.data_ptr<T>(), p);
      gw = std::get<1>(at::convolution_backward(a, x, weight, std::nullopt, stride, padding,
                                                dilation, false, {0, 0}, groups,
                                                {false, true, false}));
    }
  });
  auto all = at::from_blob(acc.data(), {ix.taps()}, at::kDouble);
  auto stats = all.narrow(0, 0, kStats * C).to(at::kFloat).reshape({kStats, C}).clone();
  auto gb = all.narrow(0, ix.bias(), C).to(opt.dtype()).clone();
  auto gc = all.narrow(0, ix.casc(0), D * C).to(opt.dtype()).reshape({D, C}).clone();
  // the parameter gradients are contiguous whatever the layout of x (the op's fake says so)
  return {stats, gw.contiguous(), gb, gc};
}

// candidate_epilogue: the pass after the conv, on a pre-activation z the caller computed (a
// candidate's conv and BatchNorm). Returns (the float64 sums (6 + D, Cout): v, e, v e, e e,
// v v, dL/dz, dL/dz s_j; dL/dz in the layout of z).
std::tuple<at::Tensor, at::Tensor> epilogue_cpu(
    const at::Tensor& z, const std::optional<at::Tensor>& cascade_,
    const std::optional<at::Tensor>& s_, const at::Tensor& e_, const at::Tensor& mean_e_,
    const at::Tensor& sign_) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  TORCH_CHECK(z.dim() == 4, "pbp_fast: z must be 4-D");
  Geom g{};
  g.N = z.size(0); g.Cout = z.size(1); g.Ho = z.size(2); g.Wo = z.size(3);
  g.channels_last = is_channels_last(z);
  const auto fmt = format_of(g.channels_last);
  const CandInputs in(cascade_, s_, e_, mean_e_, sign_, fmt);
  auto ga = z.clone(fmt);  // overwritten with dL/dz
  std::vector<double> acc;
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "candidate_epilogue", [&] {
    acc = candidate_epilogue<scalar_t>(g, ga.data_ptr<scalar_t>(), in.args<scalar_t>(g));
  });
  auto sums = at::from_blob(acc.data(), {kStats + 1 + in.D, g.Cout}, at::kDouble).clone();
  return {sums, ga};
}

}  // namespace

// C_c from the running means m (kStats rows of C), reference.correlation:
// (m_ve - m_v m_e) / sqrt(var_e + eps), times 1 / sqrt(var_v + eps) with pearson.
inline double correlation(const double* m, int64_t C, int64_t c, bool pearson = false) {
  const double mv = m[c], me = m[C + c], mve = m[2 * C + c], mee = m[3 * C + c];
  double den = std::max(mee - me * me, 0.0) + 1e-12;
  if (pearson) den *= std::max(m[4 * C + c] - mv * mv, 0.0) + 1e-12;
  return (mve - mv * me) / std::sqrt(den);
}

void check_state(const at::Tensor& t, const char* name, bool matrix) {
  TORCH_CHECK(t.scalar_type() == at::kDouble && t.is_contiguous() && t.dim() == (matrix ? 2 : 0) &&
                  (!matrix || t.size(0) == kStats),
              "pbp_fast: ", name, " must be a contiguous float64 ", matrix ? "(5, C)" : "0-dim",
              " tensor");
}

std::tuple<at::Tensor, at::Tensor> objective_cpu(const at::Tensor& mean, at::ScalarType dtype) {
  check_state(mean, "mean", true);
  const int64_t C = mean.size(1);
  auto sign = at::empty({C}, mean.options());
  const double* m = mean.data_ptr<double>();
  double* sg = sign.data_ptr<double>();
  for (int64_t c = 0; c < C; ++c) sg[c] = correlation(m, C, c) >= 0 ? 1.0 : -1.0;
  return {mean[1].to(dtype, false, true), sign.to(dtype)};
}

at::Tensor update_cpu(at::Tensor& mean, at::Tensor& count, at::Tensor& batches,
                      at::Tensor& best_score, const at::Tensor& sums_, const at::Tensor& n_,
                      int64_t warmup, double momentum, double threshold, bool pearson) {
  check_state(mean, "mean", true);
  check_state(count, "count", false);
  check_state(batches, "batches", false);
  const int64_t C = mean.size(1);
  const bool per_channel = best_score.dim() == 1;  // else 0-dim: one score for the unit
  TORCH_CHECK(best_score.scalar_type() == at::kDouble && best_score.is_contiguous() &&
                  (best_score.dim() == 0 || (per_channel && best_score.size(0) == C)),
              "pbp_fast: best_score must be a contiguous float64 0-dim or (C,) tensor");
  TORCH_CHECK(sums_.dim() == 2 && sums_.size(0) == kStats && sums_.size(1) == C,
              "pbp_fast: sums must have the shape of mean");
  const auto sums = sums_.to(at::kDouble).contiguous();
  const double n = n_.item<double>();  // a CPU scalar: no device synchronisation
  const double* s = sums.data_ptr<double>();
  double* m = mean.data_ptr<double>();
  double* cnt = count.data_ptr<double>();
  double* bt = batches.data_ptr<double>();
  double* best = best_score.data_ptr<double>();
  bool ok = n > 0;
  for (int64_t i = 0; i < kStats * C && ok; ++i) ok = std::isfinite(s[i]);
  if (ok) {
    const double w = *bt < warmup ? n / (*cnt + n) : 1.0 - momentum;
    for (int64_t i = 0; i < kStats * C; ++i) m[i] += w * (s[i] / n - m[i]);
    *cnt += n;
    *bt += 1;
  }
  auto better = at::zeros(best_score.sizes(), mean.options().dtype(at::kBool));
  bool* bet = better.data_ptr<bool>();
  const bool warm = *bt >= warmup;
  auto decide = [&](double score, int64_t i) {
    bet[i] = warm && score > best[i] * (1.0 + threshold);
    if (bet[i]) best[i] = score;
  };
  if (per_channel) {
    for (int64_t c = 0; c < C; ++c) decide(std::abs(correlation(m, C, c, pearson)), c);
  } else {
    double score = 0;
    for (int64_t c = 0; c < C; ++c) score += std::abs(correlation(m, C, c, pearson));
    decide(score, 0);
  }
  return better;
}

TORCH_LIBRARY_IMPL(pbp_fast, CPU, m) {
  m.impl("candidate_pass", &candidate_cpu);
  m.impl("candidate_epilogue", &epilogue_cpu);
  m.impl("candidate_objective", &objective_cpu);
  m.impl("candidate_update", &update_cpu);
}

}  // namespace pbp
