import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # h2peer, the tests' HTTP/2 client
