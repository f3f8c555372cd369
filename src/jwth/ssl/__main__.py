"""``python -m jwth.ssl <command> ...`` runs the jwth CLI; useful under torchrun:

    torchrun --nproc_per_node 2 -m jwth.ssl pretrain --data DIR --out RUN [key=value ...]
"""

from jwth.cli import main

if __name__ == "__main__":
    main()
