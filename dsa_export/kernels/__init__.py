"""Reference ops in plain torch, Triton kernels, torch.library registration of the dsa:: ops, AOT compilation per GPU."""
