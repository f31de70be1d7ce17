"""A noisy classifier on the digits, for classifier guidance of the digits DDPM demo.

  python main.py --config=configs/digits_classifier.py --workdir=runs/digits_classifier

guided-diffusion's classifier_train.py recipe (noised x_t at t ~ U{0..T-1}, cross-entropy,
AdamW with weight decay 0.05) at the size of the digits: the encoder half of the ADM U-Net
(nn/classifier.py: ch 32, feature maps 8x8 and 4x4, one residual block per level, attention at
4x4, attention pooling), on the SAME schedule as configs/digits.py (this config starts from it,
so diffusion.ddpm is the digits model's: 1000 linear steps), which its guidance needs: the
classifier must know the noise levels of the model it guides. Use the run as
`sample.classifier_workdir` of a configs/digits.py run.

Trains in under a minute on a 2-core CPU split into one device per core: 1500 steps, 51.5 s
wall for the command above on an idle machine (10 s of it compiling; ~50 steps/s), 83 s while
another job shared the CPU (measured 2026-12-07; both runs gave the same bits). The last log
window (steps 1401-1500, raw parameters on the training stream):

  t quarter     q0 (t < 250)   q1 (250-499)   q2 (500-749)   q3 (750-999)   all
  accuracy      0.946          0.514          0.183          0.099          0.437
  loss (nats)   0.148          1.415          2.217          2.305          1.517

The EMA parameters on all 1797 digits, t uniform in each quarter: 0.956, 0.504, 0.180, 0.114.
Chance is 0.1: at 8x8 an image at abar_t < 0.1 (t > ~480) keeps little of its digit, and
training 4000 steps instead leaves q1 at 0.51-0.53, so the classifier is limited by the noise,
not by its training; guidance acts mostly through the less noisy half.

The train step logs the loss and top-1 accuracy per quarter of t (`acc_q0`..`acc_q3`,
`loss_q0`..`loss_q3`, q0 = the least noisy quarter) to train_metrics.jsonl and TensorBoard.
The digits have one split, so these are accuracies on the training stream (of the raw, not the
EMA, parameters). guided-diffusion anneals the learning rate linearly to 0; the nearest
schedule here is the cosine decay to 0.
"""

from configs import digits


def get_config():
  config = digits.get_config()         # The digits data and, unchanged, their DDPM schedule.
  config.diffusion.objective = 'noisy_classifier'
  config.model.arch = 'classifier'
  config.model.num_classes = 10        # Logits: scikit-learn's digits are labelled 0..9.

  c = config.model.classifier
  c.ch = 32
  c.ch_mult = (1, 2)                   # Feature maps 8x8 and 4x4.
  c.num_res_blocks = 1
  c.attn_resolutions = (4,)
  c.num_head_channels = 32             # Attention and the pool: heads of 32 channels.
  c.num_groups = 8
  c.pool = 'attention'                 # guided-diffusion's published classifiers' head.
  c.use_scale_shift_norm = True
  c.resblock_updown = True

  config.optim.optimizer = 'adamw'     # guided-diffusion: AdamW, weight decay 0.05 (README).
  config.optim.weight_decay = 0.05
  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 50
  config.optim.lr_schedule = 'cosine'  # Their anneal_lr is linear to 0.
  config.optim.ema_decay = 0.995       # sample.classifier_use_ema reads the EMA.
  config.optim.ema_warmup = True

  config.training.batch_size = 64
  config.training.num_train_steps = 1500
  config.training.log_every_steps = 100
  config.training.sample_every_steps = 0   # A classifier draws no samples.
  config.training.eval_every_steps = 0     # The in-training eval scores samples: off.
  config.training.checkpoint_every_steps = 500
  return config
