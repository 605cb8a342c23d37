"""experiments.tracking's evaluation: chunked, channels_last on CPU, and exact."""
import torch
import torch.nn.functional as F

from experiments import tracking
from experiments.models import build_model


def test_eval_matches_one_plain_forward_and_restores_the_weights_bit_for_bit():
    torch.manual_seed(0)
    x, y = torch.randn(600, 1, 28, 28), torch.randint(0, 10, (600,))
    for name in ("convnet", "bn-convnet"):
        model = build_model(name)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model.train()
        F.cross_entropy(model(x[:32]), y[:32]).backward()
        opt.step()                                    # running statistics and weights away from their init
        model.eval()
        before = {n: (p, p.data.clone(), p.data.stride()) for n, p in model.named_parameters()}
        with torch.no_grad():
            out = model(x)
        want_loss, want_acc = float(F.cross_entropy(out, y)), int((out.argmax(1) == y).sum()) / len(y)
        loss, acc = tracking._loss_and_accuracy(model, x, y)     # 600 images: three chunks on CPU
        assert abs(loss - want_loss) < 1e-5 * max(1.0, want_loss) and acc == want_acc
        for n, p in model.named_parameters():
            obj, value, stride = before[n]
            assert p is obj and torch.equal(p.data, value) and p.data.stride() == stride, n
        assert opt.param_groups[0]["params"][0] is before[next(iter(before))][0]
