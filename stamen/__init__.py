"""stamen: federated continual learning on Flower, with DP-SGD on every site.

The public Python API lives here; everything else is reached through ``stamen.server``,
``stamen.client``, ``stamen.common`` and ``stamen.simulations``.
"""
