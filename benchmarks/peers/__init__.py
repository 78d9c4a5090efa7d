"""Serving peers run side by side with modelkiln by ``benchmarks/bench_peers.py``.

``setup_peers.sh`` installs them (each in its own venv under ``$MODELKILN_PEERS_DIR``,
default ``/work/peers``); the scripts named ``*_peer.py`` here run inside those venvs.
"""
