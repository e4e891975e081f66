"""A PyTorch Lightning training run, brought under burnin by the lines marked `# burnin`.

Run it alone (`python train.py`, or `torchrun --nproc-per-node 2 train.py`) and it trains; run it from
its scenario (`burnin run examples/lightning/scenario.yaml`) and burnin's callback resumes the Trainer
after each fault from the Lightning checkpoint inside burnin's newest valid one, and burnin judges the
final state against the script's own fault-free run. Lightning resumes a DataLoader at the start of an
epoch, so burnin's checkpoints must fall on epoch ends: an epoch here is --epoch-steps steps, and the
scenario checkpoints every as many.
"""

import argparse
import os

import lightning.pytorch as L
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from burnin.integrations.lightning import BurninCallback  # burnin


class Points(Dataset):
    """Points in 16 dimensions and a label: each a pure function of its index."""

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(16, generator=torch.Generator().manual_seed(i))
        return x, (x[:4].sum() > 0).long()


class Classifier(L.LightningModule):
    def __init__(self, lr: float):
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 2))

    def setup(self, stage: str) -> None:
        torch.manual_seed(1 + self.global_rank)  # each rank its own dropout masks

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        if self.global_rank == 0 and self.global_step % 10 == 0:
            print(f"step {self.global_step} loss {loss.item():.4f}", flush=True)
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--epoch-steps", type=int, default=4, help="batches of each rank in an epoch")
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()

    # torchrun and burnin start the ranks and set WORLD_SIZE and LOCAL_RANK: Lightning joins them, it spawns none
    ranks = int(os.environ.get("WORLD_SIZE", 1))
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the same initial weights on every rank
    model = Classifier(lr=1e-2)
    # Lightning gives each rank its shard (a DistributedSampler, no shuffling): the same batches every run
    loader = DataLoader(Points(args.epoch_steps * args.batch * ranks), batch_size=args.batch)
    burnin_cb = BurninCallback()  # burnin
    trainer = L.Trainer(accelerator="cpu", devices=ranks, max_steps=args.steps, deterministic=True, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[burnin_cb])  # burnin (callbacks=)
    trainer.fit(model, loader, ckpt_path=burnin_cb.resume_path())  # burnin (ckpt_path=)


if __name__ == "__main__":
    main()
