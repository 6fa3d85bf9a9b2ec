"""The user-journey demo: pods as network namespaces, one ztunnel-fast each, real traffic."""
