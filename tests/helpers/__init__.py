"""What several test modules share (test modules never import each other; fixtures live in conftest.py)."""
