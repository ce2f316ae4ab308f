"""A plain PyTorch training script of the kind that wrote the existing checkpoint folders.

It knows nothing of cnnlstm_ext: its own CNN-LSTM with torch.nn.LSTM under other names (`cnn.`,
`proj.`, `rnn.`, `head.`) registered in another order than CNNLSTM's (head first), AdamW, a
cosine schedule, and checkpoints written with `training_history` and a nested `best_metrics`.
The tests run it to make a legacy folder, resume from its files, and load our files back in it.

    python legacy_run.py train OUT_DIR --epochs 6 [--nan-epoch 6] [--resume FILE]
    python legacy_run.py load FILE        # loads model, optimizer, scheduler; prints "loaded"
"""
import argparse
import collections
import os
import sys

import torch
from torch import nn

NUM_CLASSES, FRAMES, SIZE = 5, 4, 24
SPATIAL, HIDDEN, LAYERS = 48, 16, 2
BATCH, TRAIN_CLIPS, VAL_CLIPS = 8, 16, 10
LR, WEIGHT_DECAY = 1e-2, 1e-4


class LegacyCNNLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        # Registered head first: the optimizer's parameter order differs from CNNLSTM's.
        self.head = nn.Linear(2 * HIDDEN, NUM_CLASSES)
        self.rnn = nn.LSTM(SPATIAL, HIDDEN, num_layers=LAYERS, bidirectional=True,
                           batch_first=True)
        layers = collections.OrderedDict()
        for i, (cin, cout) in enumerate([(3, 16), (16, 32), (32, 64)], start=1):
            layers["conv%d" % i] = nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False)
            layers["bn%d" % i] = nn.BatchNorm2d(cout)
            layers["relu%d" % i] = nn.ReLU(inplace=True)
        self.cnn = nn.Sequential(layers)
        self.proj = nn.Linear(64, SPATIAL)

    def forward(self, clips):                                   # clips: [B, T, 3, H, W]
        B, T = clips.shape[:2]
        maps = self.cnn(clips.reshape(B * T, *clips.shape[2:]))   # [B*T, 64, h, w]
        feats = self.proj(maps.mean((2, 3)).view(B, T, -1))     # [B, T, SPATIAL]
        out, _ = self.rnn(feats)                                 # [B, T, 2*HIDDEN]
        return self.head(out.mean(1))                            # [B, NUM_CLASSES]


def make_data():
    """Clips whose mean brightness carries the class; validation labels avoid class 0."""
    g = torch.Generator().manual_seed(1234)

    def clips(labels):
        x = torch.randn(len(labels), FRAMES, 3, SIZE, SIZE, generator=g)
        return x + 0.5 * labels.float().view(-1, 1, 1, 1, 1)

    train_y = torch.arange(TRAIN_CLIPS) % NUM_CLASSES
    val_y = 1 + torch.arange(VAL_CLIPS) % (NUM_CLASSES - 1)
    return clips(train_y), train_y, clips(val_y), val_y


def batches(epoch, n):
    """The same shuffled order for a given epoch in every process."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
    return [order[i:i + BATCH] for i in range(0, n, BATCH)]


def train_epoch(model, optimizer, x, y, epoch):
    model.train()
    losses, correct = [], 0
    for idx in batches(epoch, len(y)):
        logits = model(x[idx])
        loss = nn.functional.cross_entropy(logits, y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        correct += (logits.argmax(1) == y[idx]).sum().item()
    return sum(losses) / len(losses), correct / len(y)


def macro_f1(pred, y):
    scores = []
    for c in range(NUM_CLASSES):
        tp = ((pred == c) & (y == c)).sum().item()
        fp = ((pred == c) & (y != c)).sum().item()
        fn = ((pred != c) & (y == c)).sum().item()
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)


@torch.no_grad()
def evaluate(model, x, y):
    model.eval()
    logits = model(x)
    pred = logits.argmax(1)
    return (nn.functional.cross_entropy(logits, y).item(), (pred == y).float().mean().item(),
            macro_f1(pred, y))


def build(epochs):
    torch.manual_seed(0)
    model = LegacyCNNLSTM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    return model, optimizer, scheduler


def train(out_dir, epochs, nan_epoch=None, resume=None):
    os.makedirs(out_dir, exist_ok=True)
    model, optimizer, scheduler = build(epochs)
    x, y, vx, vy = make_data()
    history = {k: [] for k in ("train_loss", "train_acc", "val_loss", "val_acc", "val_f1", "lr")}
    best = {"val_acc": -1.0, "val_f1": 0.0, "epoch": 0}
    start = 1
    if resume:
        ckpt = torch.load(resume, weights_only=True)
        model.load_state_dict(ckpt["model_state_dict"])
        optimizer.load_state_dict(ckpt["optimizer_state_dict"])
        scheduler.load_state_dict(ckpt["scheduler_state_dict"])
        history, best, start = ckpt["training_history"], ckpt["best_metrics"], ckpt["epoch"] + 1
    for epoch in range(start, epochs + 1):
        if epoch == nan_epoch:  # the divergence seen in the real run: weights turn NaN
            with torch.no_grad():
                model.proj.weight.fill_(float("nan"))
        lr = optimizer.param_groups[0]["lr"]
        train_loss, train_acc = train_epoch(model, optimizer, x, y, epoch)
        scheduler.step()
        val_loss, val_acc, val_f1 = evaluate(model, vx, vy)
        for k, v in zip(history, (train_loss, train_acc, val_loss, val_acc, val_f1, lr)):
            history[k].append(v)
        is_best = val_acc > best["val_acc"]
        if is_best:
            best = {"val_acc": val_acc, "val_f1": val_f1, "epoch": epoch}
        ckpt = {
            "epoch": epoch,
            "model_state_dict": model.state_dict(),
            "optimizer_state_dict": optimizer.state_dict(),
            "scheduler_state_dict": scheduler.state_dict(),
            "training_history": history,
            "best_metrics": best,
            "val_acc": val_acc, "val_f1": val_f1, "train_loss": train_loss, "lr": lr,
        }
        torch.save(ckpt, os.path.join(out_dir, "checkpoint_epoch_%04d.pth" % epoch))
        torch.save(ckpt, os.path.join(out_dir, "latest_checkpoint.pth"))
        if is_best:
            torch.save(ckpt, os.path.join(out_dir, "best_checkpoint.pth"))
    return model, optimizer, scheduler


def load(path):
    """What the old code does with a checkpoint; raises if anything does not fit."""
    model, optimizer, scheduler = build(epochs=8)
    ckpt = torch.load(path, weights_only=True)
    model.load_state_dict(ckpt["model_state_dict"])
    optimizer.load_state_dict(ckpt["optimizer_state_dict"])
    scheduler.load_state_dict(ckpt["scheduler_state_dict"])
    for p in model.parameters():  # moments must sit on parameters of their own shape
        for v in optimizer.state[p].values():
            if v.dim() > 0 and v.shape != p.shape:
                raise RuntimeError("moment %s on parameter %s" % (list(v.shape), list(p.shape)))
    x, y, _, _ = make_data()
    train_epoch(model, optimizer, x, y, ckpt["epoch"] + 1)  # one more epoch must run
    return model, optimizer, scheduler, ckpt


def main(argv):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("out_dir")
    t.add_argument("--epochs", type=int, default=6)
    t.add_argument("--nan-epoch", type=int)
    t.add_argument("--resume")
    sub.add_parser("load").add_argument("file")
    args = parser.parse_args(argv)
    if args.cmd == "train":
        train(args.out_dir, args.epochs, args.nan_epoch, args.resume)
    else:
        load(args.file)
        assert "cnnlstm_ext" not in sys.modules
        print("loaded")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
