"""Times the official md4 (JAX/Flax) training step on one GPU, as shipped (float32): the anchor
that md4_dist's training step is measured against, side by side in the same run on one machine.

    MD4_SRC=path/containing/md4 BATCH=16 python3 benchmarks/official_step.py   # on a GPU machine

md4's source is not part of this repository: fetch google-deepmind/md4 and put its md4/ folder
under .peer/ (the default MD4_SRC). benchmarks/throughput.py --official runs this first, in its
own process (JAX preallocates most of the GPU's memory), and records its figures beside ours.

Only md4.utils (plotting/checkpoint helpers) and tensorflow_probability (used
by samplers, not by the training loss) are stubbed so the model imports
without their heavy dependencies; model, loss and optimizer are theirs.
Prints one line per model: tokens/s.
"""
import sys, time, types, json, os
sys.path.insert(0, os.environ.get("MD4_SRC", os.path.join(os.getcwd(), ".peer")))
import jax, jax.numpy as jnp, numpy as np, optax

utils = types.ModuleType("md4.utils")
def reverse_broadcast(value, ndim):
    return value.reshape(value.shape + (ndim - value.ndim) * (1,)) if value.ndim < ndim else value
def loss2bpt(d, data_shape):
    s = 1.0 / (float(np.prod(data_shape)) * jnp.log(2.0))
    return {k: (v * s if "loss" in k else v) for k, v in d.items()}
def constant_init(value, dtype="float32"):
    return lambda key, shape, dtype=dtype: value * jnp.ones(shape, dtype)
utils.reverse_broadcast, utils.loss2bpt, utils.constant_init = reverse_broadcast, loss2bpt, constant_init
import md4  # noqa
sys.modules["md4.utils"] = utils; md4.utils = utils
tfp = types.ModuleType("tensorflow_probability"); sub = types.ModuleType("tensorflow_probability.substrates")
tj = types.ModuleType("tensorflow_probability.substrates.jax"); tj.distributions = types.SimpleNamespace()
sub.jax = tj; tfp.substrates = sub
sys.modules.update({"tensorflow_probability": tfp, "tensorflow_probability.substrates": sub,
                    "tensorflow_probability.substrates.jax": tj})
from md4.models.diffusion.md4 import MD4
from md4.models.diffusion.genmd4 import GenMD4

V, L, B = 50257, 1024, int(os.environ.get("BATCH", "16"))
common = dict(data_shape=(L,), cont_time=True, timesteps=1000, feature_dim=64, num_heads=12,
              n_layers=12, vocab_size=V, dropout_rate=0.0, mlp_type="glu", depth_scaled_init=True,
              cond_type="adaln_zero", outside_embed=False, time_features="t", classes=-1)

def bench(name, model, steps=20):
    rng = jax.random.PRNGKey(0)
    x = jax.random.randint(rng, (B, L), 0, V)
    params = model.init({"params": rng, "sample": rng, "dropout": rng}, x, train=False)["params"]
    nparam = sum(p.size for p in jax.tree_util.tree_leaves(params))
    opt = optax.adamw(3e-4, b1=0.9, b2=0.999, weight_decay=0.0)
    ost = opt.init(params)
    def loss_fn(p, r, xb):
        st = model.apply({"params": p}, xb, train=True, rngs={"sample": r, "dropout": r})
        return st["loss"], st
    @jax.jit
    def step(p, o, r, xb):
        (l, st), g = jax.value_and_grad(loss_fn, has_aux=True)(p, r, xb)
        u, o = opt.update(g, o, p)
        return optax.apply_updates(p, u), o, l
    for i in range(3):
        params, ost, l = step(params, ost, jax.random.fold_in(rng, i), x)
    l.block_until_ready()
    t0 = time.perf_counter()
    for i in range(steps):
        params, ost, l = step(params, ost, jax.random.fold_in(rng, 100 + i), x)
    l.block_until_ready()
    dt = (time.perf_counter() - t0) / steps
    print(json.dumps({"model": name, "batch": B, "seq": L, "params_M": round(nparam / 1e6, 1),
                      "step_s": round(dt, 4), "tokens_per_s": round(B * L / dt), "loss_bpt": float(l)}), flush=True)

print("devices", jax.devices(), flush=True)
if "md4" in os.environ.get("MODELS", "md4,genmd4").replace("genmd4", ""):
    bench("md4-S official (jax fp32)", MD4(noise_schedule_type="linear", **common))
if os.environ.get("MODELS", "md4,genmd4").find("genmd4") >= 0:
    bench("genmd4-S official (jax fp32)", GenMD4(noise_schedule_type="poly", power_init=1.0, **common))
