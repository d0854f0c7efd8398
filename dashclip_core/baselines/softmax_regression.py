"""Multinomial logistic regression (softmax regression) on fixed features, trained full-batch.

Used as the softmax relevance teacher on MiniLM pair features (``labeling``) and as the supervised
linear probe on frozen image-backbone features (``evaluation``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


class SoftmaxRegression:
    """Multinomial logistic regression on pair features (full-batch Adam with L2)."""

    def __init__(self, n_features: int, l2: float, seed: int, n_classes: int = 3) -> None:
        torch.manual_seed(seed)
        self.linear = torch.nn.Linear(n_features, n_classes)
        self.n_classes = n_classes
        self.l2 = l2

    def fit(self, x: np.ndarray, y: np.ndarray, steps: int) -> SoftmaxRegression:
        xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
        # Balanced class weights: label 2 and 0 dominate some catalogs, and a teacher that never says 1 is useless.
        counts = torch.bincount(yt, minlength=self.n_classes).float().clamp(min=1)
        weight = counts.sum() / (self.n_classes * counts)
        opt = torch.optim.Adam(self.linear.parameters(), lr=0.05)
        for _ in range(steps):
            opt.zero_grad()
            loss = F.cross_entropy(self.linear(xt), yt, weight=weight) + self.l2 * self.linear.weight.pow(2).sum()
            loss.backward()
            opt.step()
        return self

    @torch.no_grad()
    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.linear(torch.from_numpy(x)).argmax(1).numpy().astype(np.int8)
