// CPU kernels of pbp_fast::dendritic_conv2d_fwd / _bwd.
//
// Channels-last depthwise convs (groups == Cin == Cout) run a direct kernel that computes the main
// conv and all D dendrites for a block of output pixels, all channels, and applies the epilogue
// in L1. 1x1 convs run one GEMM per tile over the stacked weights [W; W_0; ...; W_{D-1}]; other
// convs (NCHW depthwise included: ATen's is faster than a direct loop over 32-pixel rows) run
// ATen convolutions followed by the fused epilogue. The backward is the fused epilogue's sums
// plus ATen (or GEMMs) for the conv-shaped gradients; it is perforated: x receives the gradient
// of the main conv only.
#include "common.h"

#include <torch/library.h>

namespace pbp {
namespace {

template <typename T>
struct View {  // element (n, c, pixel) of an (N, C, Ho*Wo) tensor in either layout
  T* p = nullptr;
  int64_t bs = 0, cs = 0, ps = 0;
  T* at(int64_t n, int64_t c, int64_t pix) const { return p ? p + n * bs + c * cs + pix * ps : nullptr; }
};

template <typename T>
View<T> view_of(const at::Tensor& t, const Geom& g) {  // t is (N, C, Ho, Wo) in g's layout
  if (!t.defined() || t.numel() == 0) return {};
  return {t.data_ptr<T>(), t.stride(0), t.stride(1), g.channels_last ? t.stride(3) : 1};
}

at::Tensor opt_or(const std::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); }

// ---------------------------------------------------------------- depthwise, forward
template <typename T>
void dw_fwd(const Geom& g, const T* x, const std::vector<const T*>& w,
            const std::vector<const T*>& b, bool has_main, const View<T>& base,
            const T* alpha, const T* casc, const View<T>& y, const std::vector<View<T>>& s) {
  const int64_t M = (int64_t)w.size(), D = M - (has_main ? 1 : 0), C = g.Cout;
  const int64_t KK = g.KH * g.KW;
  const bool save = !s.empty();
  // w[m] holds the transposed taps (KH*KW, C).
  at::parallel_for(0, g.N * g.Ho, 1, [&](int64_t r0, int64_t r1) {
    std::vector<T> acc(M * kPixBlock * C), tmp(D * C);
    std::vector<const T*> a(D);
    std::vector<T*> sl(D);
    std::vector<int64_t> xoff(KK), woff(KK);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / g.Ho, oh = r % g.Ho;
      for_pixel_blocks(g, n, oh, xoff.data(), woff.data(), [&](int64_t ow, auto Pc, int64_t nt) {
        constexpr int64_t P = decltype(Pc)::value;
        for (int64_t m = 0; m < M; ++m) {
          const DwTaps<T> tp{x, w[m], xoff.data(), woff.data(), nt, g.SW * C,
                              dw_row3(g)};
          dw_pixels<P>(tp, b[m], C, acc.data() + m * P * C);
        }
        for (int64_t p = 0; p < P; ++p) {
          const int64_t pix = oh * g.Wo + ow + p;
          for (int64_t k = 0; k < D; ++k) {
            a[k] = acc.data() + ((M - D + k) * P + p) * C;
            sl[k] = save ? s[k].at(n, 0, pix) : tmp.data() + k * C;
          }
          fwd_line<true>(C, D, C, (const T*)base.at(n, 0, pix),
                         has_main ? (const T*)acc.data() + p * C : nullptr, a.data(), alpha,
                         casc, y.at(n, 0, pix), sl.data());
        }
      });
    }
  });
}


// ---------------------------------------------------------------- epilogue over conv outputs
template <typename T>
void epilogue_fwd(const Geom& g, const View<T>& main, const std::vector<View<T>>& a,
                  const View<T>& base, const T* alpha, const T* casc, const View<T>& y,
                  const std::vector<View<T>>& s) {
  const int64_t D = (int64_t)a.size(), C = g.Cout, HW = g.HW();
  const bool save = !s.empty();
  const bool cl = channel_lines(g);
  at::parallel_for(0, cl ? g.N * HW : g.N * C, 16, [&](int64_t l0, int64_t l1) {
    const int64_t L = cl ? C : HW;
    std::vector<T> tmp(D * L);
    std::vector<const T*> al(D);
    std::vector<T*> sl(D);
    for (int64_t l = l0; l < l1; ++l) {
      const int64_t n = cl ? l / HW : l / C, c = cl ? 0 : l % C, pix = cl ? l % HW : 0;
      for (int64_t k = 0; k < D; ++k) {
        al[k] = a[k].at(n, c, pix);
        sl[k] = save ? s[k].at(n, c, pix) : tmp.data() + k * L;
      }
      if (cl)
        fwd_line<true>(L, D, C, (const T*)base.at(n, c, pix), (const T*)main.at(n, c, pix),
                       al.data(), alpha, casc, y.at(n, c, pix), sl.data());
      else
        fwd_line<false>(L, D, C, (const T*)base.at(n, c, pix), (const T*)main.at(n, c, pix),
                        al.data(), alpha + c, casc + c, y.at(n, c, pix), sl.data());
    }
  });
}


// View of member m of a stacked, group-interleaved conv output (N, M * Cout, Ho, Wo).
template <typename T>
View<T> member_view(const at::Tensor& A, const Geom& g, int64_t M, int64_t m) {
  View<T> v = view_of<T>(A, g);
  // channel c of member m sits at (c / Cg) * M * Cg + m * Cg + c % Cg; for groups == 1 that is
  // m * Cout + c, an offset; for groups > 1 the caller uses per-member tensors instead.
  v.p += m * g.Cout * v.cs;
  return v;
}

std::vector<at::Tensor> member_weights(const at::Tensor& weight, const at::Tensor& d_weight) {
  std::vector<at::Tensor> ws;
  if (weight.defined()) ws.push_back(weight);
  for (int64_t k = 0; k < d_weight.size(0); ++k) ws.push_back(d_weight[k]);
  return ws;
}

// ---------------------------------------------------------------- pointwise, forward
// 1x1 convs (stride 1, no padding, groups 1): one GEMM for all members per tile into a
// cache-sized buffer (per sample in NCHW, through ATen; per tile of 48 pixels in NHWC or when
// Ho*Wo == 1, e.g. a Linear, through gemm_groups), then the epilogue from that buffer: the
// stacked conv output never reaches memory (except for few pixels, one ATen GEMM).

template <typename T>
void pw_fwd(const Geom& g, const at::Tensor& x, const at::Tensor& w_all, const at::Tensor& b_all,
            bool has_main, const View<T>& base, const T* alpha, const T* casc, const View<T>& y,
            const std::vector<View<T>>& s) {
  const int64_t O = g.Cout, MO = w_all.size(0), M = MO / O, D = M - (has_main ? 1 : 0);
  const int64_t HW = g.HW();
  const bool save = !s.empty();
  if (!g.channels_last && HW > 1) {
    at::parallel_for(0, g.N, 1, [&](int64_t n0, int64_t n1) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;  // thread-local: again per worker
      auto buf = at::empty({MO, HW}, x.options());
      const auto bias = b_all.unsqueeze(1);
      std::vector<T> tmp(D * HW);
      std::vector<const T*> a(D);
      std::vector<T*> sl(D);
      for (int64_t n = n0; n < n1; ++n) {
        at::addmm_out(buf, bias, w_all, x[n].view({g.Cin, HW}));
        const T* B = buf.data_ptr<T>();
        for (int64_t c = 0; c < O; ++c) {
          for (int64_t k = 0; k < D; ++k) {
            a[k] = B + ((M - D + k) * O + c) * HW;
            sl[k] = save ? s[k].at(n, c, 0) : tmp.data() + k * HW;
          }
          fwd_line<false>(HW, D, O, (const T*)base.at(n, c, 0), has_main ? B + c * HW : nullptr,
                          a.data(), alpha + c, casc + c, y.at(n, c, 0), sl.data());
        }
      }
    });
    return;
  }
  // NHWC (or a 1x1 map): tiles of kTileGroups groups of kGemmRows pixels through gemm_groups
  // into a buffer that stays in L2, then the epilogue from there. With fewer than four tiles a
  // thread (a Linear, the last small maps), one library GEMM (its own threads, w read once
  // by each), then the epilogue.
  constexpr int64_t kTileGroups = 8;
  const int64_t rows = g.N * HW, K = g.Cin, R = kGemmRows, TR = kTileGroups * R;
  const int64_t groups = (rows + R - 1) / R, tiles = (rows + TR - 1) / TR;
  auto x2 = x.permute({0, 2, 3, 1}).reshape({rows, K});
  auto epilogue = [&](int64_t r0, int64_t r1, const T* buf, int64_t ld) {  // buf: row r0
    std::vector<T> tmp(D * O);
    std::vector<const T*> a(D);
    std::vector<T*> sl(D);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / HW, pix = r % HW;
      const T* row = buf + (r - r0) * ld;
      for (int64_t k = 0; k < D; ++k) {
        a[k] = row + (M - D + k) * O;
        sl[k] = save ? s[k].at(n, 0, pix) : tmp.data() + k * O;
      }
      fwd_line<true>(O, D, O, (const T*)base.at(n, 0, pix), has_main ? row : nullptr, a.data(),
                     alpha, casc, y.at(n, 0, pix), sl.data());
    }
  };
  if (tiles < 4 * at::get_num_threads()) {
    const auto out = at::addmm(b_all, x2, w_all.t());
    at::parallel_for(0, rows, 8, [&](int64_t r0, int64_t r1) {
      epilogue(r0, r1, out.data_ptr<T>() + r0 * MO, MO);
    });
    return;
  }
  if (rows % R) x2 = at::cat({x2, x2.new_zeros({groups * R - rows, K})});  // whole groups
  x2 = x2.contiguous();
  const auto w2 = w_all.contiguous(), b2 = b_all.contiguous();
  const PackedCols<T> packed(w2.data_ptr<T>(), b2.data_ptr<T>(), MO, K);
  const T* X = x2.data_ptr<T>();
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> buf(TR * packed.NP);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * TR, r1 = std::min(rows, r0 + TR);
      gemm_groups(packed, X + r0 * K, (r1 - r0 + R - 1) / R, buf.data());
      epilogue(r0, r1, buf.data(), packed.NP);
    }
  });
}


std::tuple<at::Tensor, at::Tensor> fwd_cpu(
    const at::Tensor& x_, const std::optional<at::Tensor>& weight_,
    const std::optional<at::Tensor>& bias_, const std::optional<at::Tensor>& base_,
    const at::Tensor& d_weight, const std::optional<at::Tensor>& d_bias_,
    const at::Tensor& d_scale_, const std::optional<at::Tensor>& d_cascade_,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    bool save_s) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // ATen calls inside are not recorded
  const Geom g = make_geom(x_, d_weight, stride, padding, dilation, groups);
  const auto fmt = format_of(g.channels_last);
  const int64_t D = d_weight.size(0), C = g.Cout;
  auto x = x_.contiguous(fmt);
  auto weight = opt_or(weight_), bias = opt_or(bias_), d_bias = opt_or(d_bias_);
  auto base = base_.has_value() ? base_->contiguous(fmt) : at::Tensor();
  auto d_scale = d_scale_.contiguous();
  auto d_cascade = d_cascade_.has_value() ? d_cascade_->contiguous()
                                          : at::zeros({D, D, C}, d_scale.options());
  auto y = at::empty({g.N, C, g.Ho, g.Wo}, x.options().memory_format(fmt));
  auto s = save_s ? empty_stacked(D, g, x.options()) : at::empty({0}, x.options());
  if (g.N == 0) {
    if (base.defined()) y.copy_(base); else y.zero_();
    return {y, s};
  }
  const bool has_main = weight.defined();
  if (!has_main && D == 0) {  // nothing but the base
    y.copy_(base);
    return {y, s};
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dendritic_conv2d_fwd", [&] {
    using T = scalar_t;
    std::vector<View<T>> sv;
    for (int64_t k = 0; save_s && k < D; ++k) sv.push_back(view_of<T>(s[k], g));
    const View<T> yv = view_of<T>(y, g), bv = view_of<T>(base, g);
    const T* alpha = d_scale.data_ptr<T>();
    const T* casc = d_cascade.data_ptr<T>();
    if (is_depthwise(g) && g.channels_last) {
      std::vector<at::Tensor> keep = member_weights(weight, d_weight);
      std::vector<const T*> w, b;
      for (auto& t : keep) {
        t = g.channels_last ? t.reshape({C, g.KH * g.KW}).t().contiguous() : t.contiguous();
        w.push_back(t.data_ptr<T>());
      }
      auto biasc = bias.defined() ? bias.contiguous() : bias;
      auto dbiasc = d_bias.defined() ? d_bias.contiguous() : d_bias;
      if (has_main) b.push_back(biasc.defined() ? biasc.data_ptr<T>() : nullptr);
      for (int64_t k = 0; k < D; ++k)
        b.push_back(dbiasc.defined() ? dbiasc.data_ptr<T>() + k * C : nullptr);
      dw_fwd<T>(g, x.data_ptr<T>(), w, b, has_main, bv, alpha, casc, yv, sv);
      return;
    }
    // General convs: one convolution over the stacked members, then the epilogue.
    std::vector<at::Tensor> ws = member_weights(weight, d_weight), bs;
    const int64_t M = (int64_t)ws.size();
    for (int64_t m = 0; m < M; ++m) {
      const bool is_main = has_main && m == 0;
      const at::Tensor bm = is_main ? bias : (d_bias.defined() ? d_bias[m - (has_main ? 1 : 0)]
                                                              : at::Tensor());
      bs.push_back(bm.defined() ? bm : at::zeros({C}, x.options()));
    }
    if (is_pointwise(g)) {
      pw_fwd<T>(g, x, at::cat(ws).reshape({M * C, g.Cin}), at::cat(bs), has_main, bv, alpha,
                 casc, yv, sv);
      return;
    }
    std::vector<at::Tensor> outs;  // one stacked output (groups == 1) or one per member
    if (groups == 1) {
      outs.push_back(at::convolution(x, at::cat(ws), at::cat(bs), stride, padding, dilation,
                                     false, {0, 0}, 1).contiguous(fmt));
    } else {
      for (int64_t m = 0; m < M; ++m)
        outs.push_back(at::convolution(x, ws[m], bs[m], stride, padding, dilation, false,
                                       {0, 0}, groups).contiguous(fmt));
    }
    auto mv = [&](int64_t m) {
      return groups == 1 ? member_view<T>(outs[0], g, M, m) : view_of<T>(outs[m], g);
    };
    std::vector<View<T>> av;
    for (int64_t k = 0; k < D; ++k) av.push_back(mv(M - D + k));
    const View<T> main = has_main ? mv(0) : View<T>();
    epilogue_fwd<T>(g, main, av, bv, alpha, casc, yv, sv);
  });
  return {y, s};
}

// ---------------------------------------------------------------- backward
// Epilogue backward over a (N, Cout, Ho, Wo) gradient: the per-channel sums, and da written to
// `da` views when given.
template <typename T>
std::vector<double> epilogue_bwd(const Geom& g, const View<T>& gy, const std::vector<View<T>>& s,
                                 const T* alpha, const T* casc, const bool* mask,
                                 const std::vector<View<T>>& da) {
  const int64_t D = (int64_t)s.size(), C = g.Cout, HW = g.HW();
  const BwdAcc ix{D, C};
  const bool need_da = mask[3] || mask[4] || mask[6];
  const bool cl = channel_lines(g);
  const int64_t lines = cl ? g.N * HW : g.N;
  return chunked_sum(lines, ix.size(), cl ? 1 : HW, [&](int64_t l0, int64_t l1, double* acc) {
    const int64_t L = cl ? C : HW;
    std::vector<T> tmp(D * L);
    std::vector<T*> dl(D);
    std::vector<const T*> sl(D);
    Partial<T> part(cl ? ix.size() : 0);  // NHWC: sums over kRun pixels in T
    for (int64_t l = l0; l < l1; ++l) {
      if (cl && (l - l0) % kRun == 0) part.flush(acc);
      for (int64_t c = 0; c < (cl ? 1 : C); ++c) {
        const int64_t n = cl ? l / HW : l, pix = cl ? l % HW : 0;
        for (int64_t k = 0; k < D; ++k) {
          sl[k] = s[k].at(n, c, pix);
          dl[k] = da.empty() ? tmp.data() + k * L : da[k].at(n, c, pix);
        }
        if (cl)
          bwd_line<true>(L, D, C, gy.at(n, c, pix), sl.data(), alpha, casc, mask[2], mask[5],
                         need_da, dl.data(), part.data(), ix);
        else
          bwd_line<false>(L, D, C, gy.at(n, c, pix), sl.data(), alpha + c, casc + c, mask[2],
                          mask[5], need_da, dl.data(), acc + c, ix);
      }
    }
    if (cl) part.flush(acc);
  });
}


at::Tensor from_acc(const std::vector<double>& acc, int64_t off, at::IntArrayRef shape,
                    const at::TensorOptions& opt) {
  int64_t n = 1;
  for (auto v : shape) n *= v;
  auto t = at::from_blob(const_cast<double*>(acc.data()) + off, {n}, at::kDouble);
  return t.to(opt.dtype()).reshape(shape).clone();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
bwd_cpu(const at::Tensor& grad_y_, const at::Tensor& x_, const std::optional<at::Tensor>& weight_,
        const at::Tensor& d_weight, const at::Tensor& d_scale_,
        const std::optional<at::Tensor>& d_cascade_, const at::Tensor& s_,
        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
        std::array<bool, 7> mask_in) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // ATen calls inside are not recorded
  const Geom g = make_geom(x_, d_weight, stride, padding, dilation, groups);
  const auto fmt = format_of(g.channels_last);
  const int64_t D = d_weight.size(0), C = g.Cout;
  auto weight = opt_or(weight_);
  bool mask[7];
  for (int i = 0; i < 7; ++i) mask[i] = mask_in[i];
  if (!weight.defined()) mask[0] = mask[1] = mask[2] = false;
  if (!d_cascade_.has_value()) mask[6] = false;
  TORCH_CHECK(!(mask[3] || mask[4] || mask[5] || mask[6]) || D == 0 || s_.dim() == 5,
              "pbp_fast: dendrite gradients need the activations saved by the forward");
  auto x = x_.contiguous(fmt), gy = grad_y_.contiguous(fmt), d_scale = d_scale_.contiguous();
  auto d_cascade = d_cascade_.has_value() ? d_cascade_->contiguous()
                                          : at::zeros({D, D, C}, d_scale.options());
  auto opt = x.options();
  auto none = [&] { return at::empty({0}, opt); };  // a masked-off output (never shared)
  at::Tensor gx = none(), gw = none(), gb = none(), gdw = none(), gdb = none(), gds = none(),
             gdc = none();
  if (g.N == 0) {
    if (mask[0]) gx = at::zeros(x.sizes(), opt.memory_format(fmt));
    if (mask[1]) gw = at::zeros_like(weight);
    if (mask[2]) gb = at::zeros({C}, opt);
    if (mask[3]) gdw = at::zeros_like(d_weight);
    if (mask[4]) gdb = at::zeros({D, C}, opt);
    if (mask[5]) gds = at::zeros({D, C}, opt);
    if (mask[6]) gdc = at::zeros({D, D, C}, opt);
    return {gx, gw, gb, gdw, gdb, gds, gdc};
  }
  std::vector<double> acc;
  const BwdAcc ix{D, C};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dendritic_conv2d_bwd", [&] {
    using T = scalar_t;
    std::vector<View<T>> sv;
    for (int64_t k = 0; k < D && s_.dim() == 5; ++k) sv.push_back(view_of<T>(s_[k], g));
    if (sv.empty() && D > 0) {  // only main-conv gradients requested, no activations saved
      for (auto i : {3, 4, 5, 6}) mask[i] = false;
    }
    const int64_t Ds = (int64_t)sv.size();
    const T* alpha = d_scale.data_ptr<T>();
    const T* casc = d_cascade.data_ptr<T>();
    at::Tensor da_all;  // dL/da_k stacked like a conv output with D * Cout channels
    std::vector<View<T>> dav;
    if (mask[3] && Ds > 0) {
      da_all = at::empty({g.N, D * C, g.Ho, g.Wo}, opt.memory_format(fmt));
      for (int64_t k = 0; k < D; ++k) dav.push_back(member_view<T>(da_all, g, D, k));
    }
    if (Ds > 0 || mask[2]) {
      acc = epilogue_bwd<T>(g, view_of<T>(gy, g), sv, alpha, casc, mask, dav);
    }
    if (is_pointwise(g)) {  // 1x1: the gradients are GEMMs over pixels
      if (mask[0]) gx = pw_grad_input(g, gy, weight);
      if (mask[1]) gw = pw_grad_weight(g, gy, x).view(weight.sizes());
      if (mask[3] && Ds > 0) gdw = pw_grad_weight(g, da_all, x).view(d_weight.sizes());
      return;
    }
    if (mask[0] || mask[1]) {
      auto r = at::convolution_backward(gy, x, weight, std::nullopt, stride, padding, dilation,
                                        false, {0, 0}, groups, {mask[0], mask[1], false});
      if (mask[0]) gx = std::get<0>(r);
      if (mask[1]) gw = std::get<1>(r);
    }
    if (mask[3] && Ds > 0) {
      if (groups == 1) {
        auto wd = d_weight.reshape({D * C, d_weight.size(2), g.KH, g.KW});
        gdw = std::get<1>(at::convolution_backward(da_all, x, wd, std::nullopt, stride,
                                                   padding, dilation, false, {0, 0}, 1,
                                                   {false, true, false}))
                  .reshape(d_weight.sizes());
      } else {
        std::vector<at::Tensor> ks;
        for (int64_t k = 0; k < D; ++k)
          ks.push_back(std::get<1>(at::convolution_backward(
              da_all.narrow(1, k * C, C).contiguous(fmt), x, d_weight[k], std::nullopt,
              stride, padding, dilation, false, {0, 0}, groups, {false, true, false})));
        gdw = at::stack(ks);
      }
    }
  });
  if (mask[2]) gb = from_acc(acc, ix.bias(), {C}, opt);
  if (mask[5]) gds = D ? from_acc(acc, ix.alpha(0), {D, C}, opt) : at::zeros({0, C}, opt);
  if (mask[4]) gdb = D ? from_acc(acc, ix.dbias(0), {D, C}, opt) : at::zeros({0, C}, opt);
  if (mask[6]) gdc = D ? from_acc(acc, ix.casc(0, 0), {D, D, C}, opt) : at::zeros({0, 0, C}, opt);
  // Requested gradients that nothing contributed to (D = 0, no saved activations) are zeros.
  auto zeros_if = [&](at::Tensor& t, bool want, at::IntArrayRef shape) {
    if (want && t.sizes() != shape) t = at::zeros(shape, opt);
  };
  zeros_if(gdw, mask_in[3], d_weight.sizes());
  zeros_if(gdb, mask_in[4], {D, C});
  zeros_if(gds, mask_in[5], {D, C});
  zeros_if(gdc, mask_in[6] && d_cascade_.has_value(), {D, D, C});
  if (mask[0]) gx = gx.contiguous(fmt);
  return {gx, gw.contiguous(), gb, gdw.contiguous(), gdb,
          gds, gdc};
}

}  // namespace

TORCH_LIBRARY_IMPL(pbp_fast, CPU, m) {
  m.impl("dendritic_conv2d_fwd", &fwd_cpu);
  m.impl("dendritic_conv2d_bwd", &bwd_cpu);
}

}  // namespace pbp
