"""mim_agg entry point; see README.md. Example: python run.py experiment=quickstart"""

from mim_agg.cli import main

if __name__ == "__main__":
    main()
