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


def nin() -> List[Shape]:
    # Network in Network for CIFAR-10 (Lin, Chen & Yan 2014; the configuration of its Caffe
    # model zoo entry, one of Yoshida & Miyato's models): three mlpconv blocks, each a kxk conv
    # followed by two 1x1 convs: 5x5/192, 1x1/160, 1x1/96 | 5x5/192, 1x1/192, 1x1/192 |
    # 3x3/192, 1x1/192, 1x1/10 (global average pooling, no linear layer).
    convs = [(192, 5), (160, 1), (96, 1), (192, 5), (192, 1), (192, 1), (192, 3), (192, 1), (10, 1)]
    shapes, cin = [], 3
    for cout, k in convs:
        shapes.append((cout, cin, k, k))
        cin = cout
    return shapes


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


def vit_b16() -> List[Shape]:
    # ViT-B/16 (Dosovitskiy et al. 2021; torchvision vit_b_16): patch embedding conv 16x16/768
    # from 3 channels (768 x 3*16*16); 12 encoder blocks of d_model 768, MLP 3072: attention
    # in-projection (768 -> 2304), out-projection (768 -> 768), MLP (768 -> 3072 -> 768);
    # classification head 768 -> 1000.
    return [(768, 3, 16, 16)] + [(2304, 768), (768, 768), (3072, 768), (768, 3072)] * 12 + \
        [(1000, 768)]


def llama_1b() -> List[Shape]:
    # A Llama-style 1B decoder, the configuration of Llama 3.2 1B: 16 layers, d_model 2048,
    # 32 query heads and 8 key/value heads of dim 64 (q, o: 2048 x 2048; k, v: 512 x 2048),
    # SwiGLU MLP 8192 (gate, up: 8192 x 2048; down: 2048 x 8192).  The embedding (tied with the
    # output head) is not regularized.  0.97 G parameters: about 3.9 GB of float32 weights, and
    # as much again of gradients.
    return [(2048, 2048), (512, 2048), (512, 2048), (2048, 2048),
            (8192, 2048), (8192, 2048), (2048, 8192)] * 16


def stack_512x64x64() -> List[Shape]:
    # 512 layers of 64 x 64: many small layers, where per-layer launch/dispatch overhead dominates
    return [(64, 64)] * 512


SETS: Dict[str, callable] = {
    "vgg16-cifar": vgg16_cifar,
    "nin": nin,
    "resnet50": resnet50,
    "densenet121": densenet121,
    "vit-b16": vit_b16,
    "gpt2-small": gpt2_small,
    "llama-1b": llama_1b,
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
