"""Colab support: the repository constant, badge URLs and the in-Colab check.

``REPOSITORY`` is the one place the GitHub repository is named. Every notebook's first
cell shows :func:`badge_markdown` and its setup cell installs from :func:`pip_url`; a
test checks that the notebooks agree with these functions.
"""

from __future__ import annotations

import sys

__all__ = ["BRANCH", "REPOSITORY", "badge_markdown", "colab_url", "in_colab", "pip_url"]

REPOSITORY = "kipnb/kipnb"
BRANCH = "main"
BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"


def colab_url(notebook: str) -> str:
    """Open ``notebooks/<notebook>`` from GitHub in Colab."""
    return (
        f"https://colab.research.google.com/github/{REPOSITORY}/blob/{BRANCH}/notebooks/{notebook}"
    )


def badge_markdown(notebook: str) -> str:
    return f"[![Open In Colab]({BADGE_IMAGE})]({colab_url(notebook)})"


def pip_url() -> str:
    """What the notebooks' setup cell installs inside Colab."""
    return f"kipnb @ git+https://github.com/{REPOSITORY}@{BRANCH}"


def in_colab() -> bool:
    return "google.colab" in sys.modules
