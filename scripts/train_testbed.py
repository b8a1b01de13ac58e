"""Train one vlmfix testbed variant and save it as an HF folder.

    python scripts/train_testbed.py --variant caption_noise --out vlmfix/testbed/models/caption_noise --measure
    python scripts/train_testbed.py --smoke --out /tmp/testbed-smoke      # tiny CPU check

See ``vlmfix/testbed/train.py`` (``--help``) and docs/testbed.md.
"""

from vlmfix.testbed.train import main

if __name__ == "__main__":
    raise SystemExit(main())
