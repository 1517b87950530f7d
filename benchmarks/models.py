"""Weight-shape sets of real architectures, as the regularizer sees them: each weight matricized
along dim 0 (a conv weight out x in x kh x kw is out x in*kh*kw).  Biases, norms and embeddings
are not regularized and are not listed.  Each set states its source configuration."""

from typing import Dict, List, Tuple

Shape = Tuple[int, ...]


def vgg16_cifar() -> List[Shape]:
    # VGG-16 for CIFAR-10 (32x32): 13 3x3 convs with widths
    # 64,64 | 128,128 | 256x3 | 512x3 | 512x3 (max-pool between stages), then Linear(512, 10).
    widths = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    shapes, cin = [], 3
    for w in widths:
        shapes.append((w, cin, 3, 3))
        cin = w
    return shapes + [(10, 512)]


def resnet50() -> List[Shape]:
    # torchvision ResNet-50: conv1 7x7/64; bottleneck stages of [3, 4, 6, 3] blocks with widths
    # 64/128/256/512 and expansion 4 (1x1 reduce, 3x3, 1x1 expand; a 1x1 downsample on each
    # stage's first block); fc 2048 -> 1000.
    shapes, cin = [(64, 3, 7, 7)], 64
    for blocks, width in zip([3, 4, 6, 3], [64, 128, 256, 512]):
        for b in range(blocks):
            shapes += [(width, cin, 1, 1), (width, width, 3, 3), (4 * width, width, 1, 1)]
            if b == 0:
                shapes.append((4 * width, cin, 1, 1))
            cin = 4 * width
    return shapes + [(1000, 2048)]


def densenet121() -> List[Shape]:
    # torchvision DenseNet-121 (DenseNet-BC): conv0 7x7/64; dense blocks of (6, 12, 24, 16)
    # layers, growth rate 32, bottleneck 4*32 = 128 (1x1 then 3x3); transitions halve the
    # channels with a 1x1 conv; classifier 1024 -> 1000.
    shapes, c = [(64, 3, 7, 7)], 64
    for i, layers in enumerate([6, 12, 24, 16]):
        for _ in range(layers):
            shapes += [(128, c, 1, 1), (32, 128, 3, 3)]
            c += 32
        if i < 3:
            shapes.append((c // 2, c, 1, 1))
            c //= 2
    return shapes + [(1000, c)]


def gpt2_small() -> List[Shape]:
    # GPT-2 small: 12 blocks, d_model 768, MLP 3072; per block the attention in-projection
    # (768 -> 2304), attention out-projection (768 -> 768), MLP up (768 -> 3072) and down
    # (3072 -> 768), as nn.Linear weights (out x in).  Token/position embeddings are not included.
    return [(2304, 768), (768, 768), (3072, 768), (768, 3072)] * 12


def stack_512x64x64() -> List[Shape]:
    # 512 layers of 64 x 64: many small layers, where per-layer launch/dispatch overhead dominates
    return [(64, 64)] * 512


SETS: Dict[str, callable] = {
    "vgg16-cifar": vgg16_cifar,
    "resnet50": resnet50,
    "densenet121": densenet121,
    "gpt2-small": gpt2_small,
    "512x64x64": stack_512x64x64,
}


def numel(shapes: List[Shape]) -> int:
    total = 0
    for s in shapes:
        n = 1
        for d in s:
            n *= d
        total += n
    return total
