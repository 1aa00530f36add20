"""The reference implementations' arithmetic for Wanda and RIA, written out as their code
does it (Wanda's / RIA's ``WrappedGPT.add_batch`` and ``W_metric``), one calibration sample
per forward as their pruning loops run: the yardstick for bit-for-bit equality tests."""

import torch


def scaler_row(samples) -> torch.Tensor:
    """``scaler_row`` after feeding ``samples`` (each ``[tokens, C_in]``) one by one."""
    scaler, n = None, 0
    for inp in samples:
        inp = inp.unsqueeze(0)  # the reference's [1, tokens, C_in] batch of one sample
        if scaler is None:
            scaler = torch.zeros(inp.shape[-1])
        tmp = inp.shape[0]
        inp = inp.reshape((-1, inp.shape[-1])).t()
        scaler *= n / (n + tmp)
        n += tmp
        inp = inp.type(torch.float32)
        scaler += torch.norm(inp, p=2, dim=1) ** 2 / n
    return scaler


def wanda_metric(w: torch.Tensor, scaler: torch.Tensor) -> torch.Tensor:
    return torch.abs(w) * torch.sqrt(scaler.reshape((1, -1)))


def ria_metric(w: torch.Tensor, scaler: torch.Tensor, a: float = 0.5) -> torch.Tensor:
    return ((torch.abs(w) / torch.sum(torch.abs(w), dim=0)
             + torch.abs(w) / torch.sum(torch.abs(w), dim=1).reshape(-1, 1))
            * (torch.sqrt(scaler.reshape((1, -1)))) ** a)
