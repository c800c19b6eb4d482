"""A site of the CA-HFP digits job (NVFlare's Client API): receive the compact model, train it
one local epoch on the site's share of the digits, reply with its arrays and example count.

python client.py --sites N [--lr 0.1] [--fail-site site-2]   (run by NVFlare, not by hand)
"""

from __future__ import annotations

import argparse

import nvflare.client as flare
import torch
from digits_task import site_data, site_index, train_epoch

from cahfp_ops.fl import zoo
from cahfp_ops.integrations.nvflare import compact_model, reply


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sites", type=int, required=True)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--fail-site", default="", help="this site raises in its training (to show it being reported)")
    args = p.parse_args()
    torch.set_num_threads(1)
    flare.init()
    site = flare.get_site_name()
    x, y = site_data(site, args.sites)
    while flare.is_running():
        received = flare.receive()
        if received is None:
            break
        if site == args.fail_site:
            raise RuntimeError(f"{site}: simulated failure")
        model = compact_model(zoo.small_cnn(), received)
        loss = train_epoch(model, x, y, 1000 * received.current_round + site_index(site), args.lr)
        flare.send(reply(model, len(y), {"train_loss": loss}, received=received))


if __name__ == "__main__":
    main()
