// defines: add_export_command — `moe-bench export`: one layer case (input, parameters, routing,
// plan, output, aux loss, upstream gradient and every gradient) as a .safetensors file, so a
// PyTorch (or any other) implementation can be checked against this reference.
// Tensor names are listed in the README ("Export format"); `moe-bench replay` reads them back.
#include <fmt/format.h>
#include <memory>

#include "io/config_io.hpp"
#include "io/files.hpp"
#include "io/jsonl.hpp"
#include "io/safetensors.hpp"
#include "moe-bench/commands.hpp"
#include "moe-bench/options.hpp"
#include "moe/check.hpp"

namespace moe_bench {

namespace {

struct ExportOptions {
  moe::LayerConfig cfg;
  std::string backend = "cpu";
  std::string out;
  std::string dtype = "f32";
};

template <class Real>
void add_route_step(io::SafeTensors& st, const std::string& prefix, const moe::RouteStep<Real>& s) {
  const auto& r = s.routing;
  const int64_t n = r.size();
  st.add(prefix + "expert", r.choice_expert, {n});
  st.add(prefix + "weight", r.choice_weight, {n});
  st.add(prefix + "token", r.choice_token, {n});
}

template <class Real>
void run_typed(const ExportOptions& o) {
  LayerCase<Real> c;
  c.cfg = o.cfg;
  c.cfg.validate();
  check_case_fits_in_memory(c.cfg, sizeof(Real));
  io::check_output_path(o.out);  // fail before the work, not after it
  c.params = moe::random_params<Real>(c.cfg, c.cfg.seed);
  run_layer_case(c);

  const int64_t T = c.cfg.tokens, H = c.cfg.hidden;
  io::SafeTensors st;
  st.source = o.out;
  st.add("x", c.x, {T, H});
  for (const auto& [name, values] : moe::parameter_list(c.params))
    st.add(name, *values, parameter_shape(c.cfg, name, values->size()));

  const auto& steps = c.fwd.steps;
  const bool chain = c.cfg.router == moe::Router::chain_of_experts;
  for (size_t i = 0; i < steps.size(); ++i) {
    const std::string routing = chain ? fmt::format("routing.{}.", i) : "routing.";
    const std::string plan = chain ? fmt::format("plan.{}.", i) : "plan.";
    add_route_step(st, routing, steps[i]);
    st.add(plan + "row_token", steps[i].plan.row_token,
           {static_cast<int64_t>(steps[i].plan.row_token.size())});
    st.add(plan + "offsets", steps[i].plan.offsets,
           {static_cast<int64_t>(steps[i].plan.offsets.size())});
    if (!chain) break;  // one routing step for every other router
  }
  if (c.cfg.router == moe::Router::soft_moe) {
    const int64_t slots = c.cfg.experts * c.cfg.slots_per_expert;
    if (static_cast<int64_t>(c.fwd.soft.dispatch.size()) == T * slots) {
      st.add("soft.dispatch", c.fwd.soft.dispatch, {T, slots});
      st.add("soft.combine", c.fwd.soft.combine, {T, slots});
    }
  }

  st.add("y", c.fwd.y, {T, H});
  st.add("aux_loss", std::vector<Real>{static_cast<Real>(c.fwd.aux_loss)}, {1});
  st.add("dy", c.dy, {T, H});
  st.add("grad.x", c.dx, {T, H});
  for (const auto& [name, values] : moe::parameter_list(c.grads))
    st.add("grad." + name, *values, parameter_shape(c.cfg, name, values->size()));

  st.metadata = io::config_to_strings(c.cfg);
  st.metadata["config"] = c.cfg.summary();
  st.metadata["format"] = "moe-routing-bench case v1";
  st.metadata["dtype"] = o.dtype;
  st.metadata["git"] = io::git_revision();
  st.metadata["timestamp"] = io::iso_timestamp();
  io::write_safetensors(o.out, st);
  fmt::print("export: wrote {} tensors to {} ({})\n", st.size(), o.out, c.cfg.summary());
}

}  // namespace

void add_export_command(CLI::App& app) {
  auto o = std::make_shared<ExportOptions>();
  CLI::App* sub = app.add_subcommand(
      "export", "write one layer case (inputs, parameters, routing, outputs, gradients) as safetensors");
  add_layer_options(*sub, o->cfg);
  add_backend_option(*sub, o->backend);
  sub->add_option("--out", o->out, "output file (.safetensors); written atomically")
      ->required()
      ->type_name("FILE");
  sub->add_option_function<std::string>(
         "--dtype",
         [o](const std::string& text) {
           MOE_CHECK(text == "f32" || text == "f64", "dtype: unknown value '", text,
                     "' (allowed: f32, f64)");
           o->dtype = text;
         },
         "precision of the computation and of every float tensor")
      ->default_str(o->dtype)
      ->type_name("f32|f64");
  sub->callback([o] {
    if (o->dtype == "f64") run_typed<double>(*o);
    else run_typed<float>(*o);
  });
}

}  // namespace moe_bench
