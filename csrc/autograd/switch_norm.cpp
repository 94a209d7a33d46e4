// Switchable Normalization: the device-neutral op bodies and the autograd kernel, in C++.
//
// `switch_norm` and `_switch_norm_backward` are compositions of the fused kernels (moments, coefficients, affine;
// their backward twins), registered as CompositeExplicitAutograd so that every backend, Meta and fake tensors
// included, runs the same sequence. Autograd lives here rather than in Python because SN runs at every layer:
// the Python autograd and composite layers cost ~0.2 ms per layer and step on CPU, a tenth of the kernels' time
// on a 14x14 feature map. The synchronized (multi-GPU) backward composes the same kernels in Python
// (normkit/ops/switch_norm.py: switch_norm_input_backward), with an all-reduce in between.
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace normkit {
namespace {

using at::Tensor;
using std::optional;

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// Elements of one (n, c) plane; specialises a symbolic (dynamic-shape) size, as the kernels' `int count` needs.
int64_t plane_size(const Tensor& input) {
  c10::SymInt count = 1;
  for (int64_t d = 2; d < input.dim(); ++d) count = count * input.sym_size(d);
  return count.guard_int(__FILE__, __LINE__);
}

bool has_bn_component(const Tensor& mean_weight, bool has_instance) {
  return mean_weight.size(0) == (has_instance ? 3 : 2);
}

// torch.nn.BatchNorm's convention, r <- (1 - momentum) * r + momentum * batch; with moving_average=False the official
// batch-average mode instead sums E[x] and E[x^2] terms (normkit.nn.recompute_batch_stats turns them into statistics).
// Also an op of its own for the synchronized forward, whose BN statistics come from an all_gather.
void update_running_stats(const Tensor& running_mean, const Tensor& running_var, const Tensor& bn_stats,
                          double momentum, bool moving_average) {
  // Symbolic sizes: torch.compile traces this with fake tensors.
  TORCH_CHECK(bn_stats.dim() == 2 && bn_stats.sym_size(0) >= 2, "switch_norm: bn_stats must be (3, C), got ",
              bn_stats.sym_sizes());
  const c10::SymInt channels = bn_stats.sym_size(1);
  TORCH_CHECK(running_mean.sym_numel() == channels && running_var.sym_numel() == channels,
              "switch_norm: running_mean and running_var must have C = ", channels, " elements, got shapes ",
              running_mean.sym_sizes(), " and ", running_var.sym_sizes());
  const Tensor mean = bn_stats[0].to(running_mean.scalar_type()).reshape_symint(running_mean.sym_sizes());
  const Tensor var = bn_stats[1].to(running_var.scalar_type()).reshape_symint(running_var.sym_sizes());
  if (moving_average) {
    at::_foreach_lerp_({running_mean, running_var}, {mean, var}, momentum);  // one kernel on CUDA
  } else {
    running_mean.add_(mean);
    running_var.add_(var + mean * mean);
  }
}

std::tuple<Tensor, Tensor, Tensor> switch_norm_composite(const Tensor& input, const optional<Tensor>& weight,
                                                         const optional<Tensor>& bias, const Tensor& mean_weight,
                                                         const Tensor& var_weight, const optional<Tensor>& running_mean,
                                                         const optional<Tensor>& running_var, bool training,
                                                         double momentum, bool moving_average, bool has_instance,
                                                         double eps) {
  static const auto moments_op = find_op<Tensor(const Tensor&)>("normkit::_switch_norm_moments");
  static const auto coefficients_op =
      find_op<std::tuple<Tensor, Tensor>(const Tensor&, const optional<Tensor>&, const optional<Tensor>&,
                                         const Tensor&, const Tensor&, const optional<Tensor>&, int64_t, bool,
                                         double)>("normkit::_switch_norm_forward_coefficients");
  static const auto affine_op = find_op<Tensor(const Tensor&, const Tensor&)>("normkit::_switch_norm_affine");
  TORCH_CHECK(running_mean.has_value() == running_var.has_value(),
              "switch_norm: pass both running_mean and running_var, or neither");
  const bool uses_running = running_mean.has_value() && has_bn_component(mean_weight, has_instance);

  const Tensor moments = moments_op.call(input);
  optional<Tensor> bn_stats;
  if (uses_running && !training) {
    bn_stats = at::stack({*running_mean, *running_var, at::zeros_like(*running_mean)}).to(moments.scalar_type());
  }
  auto [coefficients, bn_used] = coefficients_op.call(moments, weight, bias, mean_weight, var_weight, bn_stats,
                                                      plane_size(input), has_instance, eps);
  // An empty batch has no statistics to move the running ones towards (its BN mean would be 0 / 0).
  if (uses_running && training && input.sym_size(0) > 0) {
    update_running_stats(*running_mean, *running_var, bn_used, momentum, moving_average);
  }
  return {affine_op.call(input, coefficients), moments, bn_used};
}

// The local backward: gradient moments, O(N*C) reductions, then dx in one elementwise pass. The BN statistics get a
// gradient only when they came from the batch.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> switch_norm_backward_composite(
    const Tensor& grad_output, const Tensor& input, const Tensor& moments, const Tensor& bn_stats,
    const optional<Tensor>& weight, const Tensor& mean_weight, const Tensor& var_weight, bool use_batch_stats,
    bool has_instance, double eps) {
  static const auto grad_moments_op =
      find_op<Tensor(const Tensor&, const Tensor&)>("normkit::_switch_norm_grad_moments");
  static const auto reduce_op =
      find_op<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                 const optional<Tensor>&, const Tensor&,
                                                                 const Tensor&, int64_t, bool, double)>(
          "normkit::_switch_norm_backward_reduce");
  static const auto coefficients_op =
      find_op<Tensor(const Tensor&, const Tensor&, const Tensor&, const optional<Tensor>&, const optional<Tensor>&,
                     const Tensor&, const Tensor&, int64_t, bool, double)>(
          "normkit::_switch_norm_backward_coefficients");
  static const auto affine_backward_op =
      find_op<Tensor(const Tensor&, const Tensor&, const Tensor&)>("normkit::_switch_norm_affine_backward");

  const int64_t count = plane_size(input);
  const Tensor grad_moments = grad_moments_op.call(grad_output, input);
  auto [grad_weight, grad_bias, grad_mean_weight, grad_var_weight, bn_grad] =
      reduce_op.call(grad_moments, moments, bn_stats, weight, mean_weight, var_weight, count, has_instance, eps);
  const optional<Tensor> batch_bn_grad = use_batch_stats ? optional<Tensor>(bn_grad) : std::nullopt;
  const Tensor coefficients = coefficients_op.call(grad_moments, moments, bn_stats, batch_bn_grad, weight,
                                                   mean_weight, var_weight, count, has_instance, eps);
  const Tensor grad_input = affine_backward_op.call(grad_output, input, coefficients);
  const auto param_dtype = weight.has_value() ? weight->scalar_type() : mean_weight.scalar_type();
  return {grad_input, grad_weight.to(param_dtype), grad_bias.to(param_dtype),
          grad_mean_weight.to(mean_weight.scalar_type()), grad_var_weight.to(var_weight.scalar_type())};
}

// Saves the input and the O(N*C) statistics only; the running buffers get no gradient.
class SwitchNormFunction : public torch::autograd::Function<SwitchNormFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& input,
                                                const optional<Tensor>& weight, const optional<Tensor>& bias,
                                                const Tensor& mean_weight, const Tensor& var_weight,
                                                const optional<Tensor>& running_mean,
                                                const optional<Tensor>& running_var, bool training, double momentum,
                                                bool moving_average, bool has_instance, double eps) {
    static const auto op = find_op<decltype(switch_norm_composite)>("normkit::switch_norm");
    torch::autograd::variable_list outputs;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      auto [output, moments, bn_stats] = op.call(input, weight, bias, mean_weight, var_weight, running_mean,
                                                 running_var, training, momentum, moving_average, has_instance, eps);
      ctx->save_for_backward({input, weight.value_or(Tensor()), mean_weight, var_weight, moments, bn_stats});
      ctx->mark_non_differentiable({moments, bn_stats});
      outputs = {output, moments, bn_stats};
    }
    // The running buffers were updated below the ADInplaceOrView key, which would have bumped their versions.
    if (training && running_mean.has_value() && has_bn_component(mean_weight, has_instance)) {
      torch::autograd::impl::bump_version(*running_mean);
      torch::autograd::impl::bump_version(*running_var);
    }
    ctx->saved_data["has_weight"] = weight.has_value();
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->saved_data["use_batch_stats"] =
        training || !running_mean.has_value() || !has_bn_component(mean_weight, has_instance);
    ctx->saved_data["has_instance"] = has_instance;
    ctx->saved_data["eps"] = eps;
    return outputs;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    static const auto op = find_op<decltype(switch_norm_backward_composite)>("normkit::_switch_norm_backward");
    // Without create_graph (grad mode off here) the backward's ops need no autograd: dispatching below the Autograd
    // key skips the boxed not-implemented fallback that each of its five ops would otherwise go through.
    std::optional<at::AutoDispatchBelowADInplaceOrView> below_autograd;
    if (!at::GradMode::is_enabled()) below_autograd.emplace();
    const auto saved = ctx->get_saved_variables();
    const bool has_weight = ctx->saved_data["has_weight"].toBool();
    const optional<Tensor> weight = has_weight ? optional<Tensor>(saved[1]) : std::nullopt;
    auto [grad_input, grad_weight, grad_bias, grad_mean_weight, grad_var_weight] =
        op.call(grad_outputs[0], saved[0], saved[4], saved[5], weight, saved[2], saved[3],
                ctx->saved_data["use_batch_stats"].toBool(), ctx->saved_data["has_instance"].toBool(),
                ctx->saved_data["eps"].toDouble());
    const Tensor none;
    return {grad_input, has_weight ? grad_weight : none, ctx->saved_data["has_bias"].toBool() ? grad_bias : none,
            grad_mean_weight, grad_var_weight, none, none, none, none, none, none, none};
  }
};

std::tuple<Tensor, Tensor, Tensor> switch_norm_autograd(const Tensor& input, const optional<Tensor>& weight,
                                                        const optional<Tensor>& bias, const Tensor& mean_weight,
                                                        const Tensor& var_weight, const optional<Tensor>& running_mean,
                                                        const optional<Tensor>& running_var, bool training,
                                                        double momentum, bool moving_average, bool has_instance,
                                                        double eps) {
  const auto out = SwitchNormFunction::apply(input, weight, bias, mean_weight, var_weight, running_mean, running_var,
                                             training, momentum, moving_average, has_instance, eps);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(normkit, CompositeExplicitAutograd, m) {
  m.impl("switch_norm", &switch_norm_composite);
  m.impl("_switch_norm_update_running_stats", &update_running_stats);
  m.impl("_switch_norm_backward", &switch_norm_backward_composite);
}

TORCH_LIBRARY_IMPL(normkit, Autograd, m) { m.impl("switch_norm", &switch_norm_autograd); }

}  // namespace normkit
