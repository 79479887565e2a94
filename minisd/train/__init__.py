"""Training the nano model: SD v1's architecture at small sizes, learned offline from coloured shapes.

shapes.py   the data: 64×64 pictures of one or two coloured shapes with captions, a fixed held-out caption set;
            the caption grammar, each relation in the phrasings people type ("over", "left of", "the", "." ...)
captions.py each picture's caption in k phrasings, tokenized once; training picks one per draw
checker.py  the judge: does a picture show its caption? (colour, shape, count, relation by image analysis)
vae_training.py        the autoencoder: L1 reconstruction + a small KL to N(0, I)
text_pretraining.py    a nano CLIP: the text encoder learns captions against pictures, contrastively; then frozen
diffusion_training.py  the lesson's loop: add noise at a random t, predict it, L_simple
common.py   EMA, resumable safetensors checkpoints, the loss log, DDP set-up
__main__.py `python -m minisd.train all --run-dir D --out F` reproduces the nano model (torchrun for DDP)

Size study (parameters counted exactly; times on the shared 2-core CI-like machine, torch 2.13 CPU fp32,
min of repeated runs, load average ~4.5 so expect ±50%):

    network                                                           params   fp16     time
    TextEncoderConfig(hidden_size=64, intermediate_size=256,          3.37 M   6.7 MB   encode b=2: 2.5 ms
        num_hidden_layers=4, num_attention_heads=4)                   (token embedding 49408 × 64 = 3.16 M)
    VAEConfig(block_out_channels=(32, 32, 64, 64), layers_per_block=1, 1.03 M   2.1 MB   decode 64×64: 12 ms
        norm_num_groups=16)
    UNetConfig(block_out_channels=(32, 64, 128, 128), layers_per_block=1, 5.80 M  11.6 MB   CFG step b=2 at 8×8:
        attention_head_dim=4, cross_attention_dim=64, norm_num_groups=16)                19 ms, 25 steps 0.47 s
    total                                                            10.2 M   20.4 MB  one picture: 0.74 s

- One picture = text encoder (b=2) + 25 UNet steps with classifier-free guidance (b=2) + VAE decode, timed end
  to end with random weights: 0.74 s on one thread (min of 7; median 0.76 s); two threads on the loaded host
  reached the same 0.77 s at best but 5 s at the median.
- The file must be fp16 (fp32 would be 41 MB); load it as fp32 for CPU compute.
- hidden_size=128 (the first idea) costs 49408 × 128 = 6.3 M parameters (12.6 MB fp16) in the token embedding
  alone, of which the captions use ~20 rows; it fits only with a 2.2 M UNet (32, 64, 64, 64). Width 64 gives
  that budget to the UNet instead.
- At b=2 and 8×8 latents the UNet is bound by per-op overhead, not FLOPs: one thread ran 18–24 ms a step for
  every UNet from 2.2 M to 8.5 M parameters, two threads 46–64 ms (thread hand-off on a loaded host). So the
  25 MB budget binds, not the 2 s one.
- Training (one thread, fwd + bwd): UNet + text encoder at b=64 ≈ 0.63 s a step in the size study; VAE at b=16
  on 64×64 ≈ 0.8–1.2 s a step. The training pictures are encoded to latents once.

The shipped run (minisd/data/nano.safetensors): the recipe below with the captions in every phrasing
(captions.py), the one command `nice -n 5 torchrun --nproc_per_node=2 -m minisd.train all`, one thread a rank, on
this 2-core machine shared with other jobs the whole time (load average 3 at the start, 7–15 during the UNet):
2 h 16 min 00 s from nothing. VAE 1,250 steps at ~1.1 s (23.2 min); latents 2.8 min; text encoder 1,500 steps
at 0.23 s (6.2 min); UNet 5,000 steps at 0.79–1.13 s (94 min); guidance choice 9.4 min (guidance 2: 99% of
training captions, 3: 98%). Per step it is the same work as the first run below (same settings, steps and sizes):
the extra wall time was the machine's load, not the recipe; whether it is 57 minutes again on a quiet machine was
not measured.
- Phrasings (over, on top of, under, beneath, underneath, left of, on the left of, right of, on the right of; "the";
  a trailing "." or "!"): each picture carries 8 of its caption's 6–48 phrasings (the documented one 25% of the
  time, plus its share of the uniform rest), one picked per draw, in the text encoder's contrastive stage and in
  the UNet's. The vocabulary and length needed no change: all 21 words are single tokens of CLIP's BPE (23 token ids
  with "." and "!"), the longest caption is 13 of the 77 tokens.
- Why the phrasings had to be trained: the first shipped model drew "a red circle left of a blue square" wrong
  about half the time. Its text encoder put the held-out scenes said with "left of" nearest their own scene's
  documented caption for 11 of 26 (end-token state, among the 56 held-out captions); "on top of" 8/30, "over"
  19/30, "under" 18/30, "beneath" 21/30, "right of" 13/26 ("the … the", a full stop, "on the left of": all).
  After the contrastive stage of the shipped run: every family, every caption (probe: 56/56, 30/30, 26/26).
- Held-out adherence at the file's guidance 2: documented captions 98.7% (4 seeds), each phrasing family 96–100%
  (2 seeds); at guidance 3: 99.6% and 96–100%. Measured again with the checker that has known diamonds since the
  textual-inversion lesson, 4 seeds everywhere: documented 96.9%, families 95.2–98.3% (README's table); 4 of the 5
  documented shape failures are squares or circles read as diamonds (98.7% again without that test).
- The same recipe learning v (`--prediction-type v`), 2026-12-06, the 2-core machine lightly shared (load ~2-3): 49 min
  9 s; VAE 1,250 steps at ~0.57 s (11 min 56 s), UNet 5,000 steps at 0.35–0.49 s (29 min 56 s), guidance choice 1.5
  (training captions 99%; 98% at 2). Its VAE and text encoder are bit for bit the shipped file's (same seed, same
  threads): only the UNet differs. Held-out at its guidance 1.5: documented 99.1%, families 98.3–100% (4 seeds).

The first shipped run (documented captions only), on this 2-core machine, quiet: 56 min 41 s from nothing, and the
file it wrote was byte for byte the one it shipped (the run was made twice: once stage by stage, once with the one
command):
- VAE: 1,250 steps at ~0.89 s (18.7 min, rank 0 while rank 1 waits); held-out PSNR 32.1 dB (2,000 steps: 33.4 dB).
- Latents of 20,000 pictures: 3.0 min. Text encoder, contrastive: 1,500 steps of 256 at 0.126 s (3.2 min).
- Diffusion (UNet only, the text encoder frozen): 5,000 steps of 64 at 0.38–0.42 s (32–33 min; 0.62 s while the text
  encoder was trained too). Guidance scale chosen on training captions: ~3 min.
- What it learned when (held-out adherence, 1 seed, guidance 3): step 1,000: 16% (shapes and counts wrong, no
  order mistakes); 2,000: 73%; 3,500: 93%; 5,000: 100% (4 seeds: 99.1%).
- The earlier recipe trained the text encoder jointly with the UNet, from random weights, through L_simple alone:
  after 7,000 steps (1 h 54 min) it drew the right objects on the right axis but the order of the two at chance
  (held-out 39.7%, every failure a mirrored pair). Under CLIP's causal mask only the tokens after the relation word
  see the whole caption, and the gradient that reaches them through the UNet is weak. A linear probe on that
  encoder's end-token state named the top/left object of 50% of training captions (41% held-out; 12 classes).
  The contrastive stage asks the end token for the whole scene directly: the same probe on the shipped encoder
  names it for 100% of training captions and 96% of held-out ones (98% / 86% from a padding token's state).
  Both recipes stay runnable: `--train-text-encoder` trains the pretrained encoder on with the UNet, and with
  `--text-steps 0` from random weights, as the earlier recipe did.
"""
