"""One solve per representation (token particles, Gaussian moments), all through diffrax."""
