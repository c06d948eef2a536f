"""`python -m ptmrec_dist ...` == `ptmrec ...`, so `torchrun -m ptmrec_dist SUBCOMMAND` works."""

from ptmrec_dist.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
