"""The one definition of the dynamics: parameters, attention, MLP, velocity fields."""
