"""HaMeR priors from raw images: HaMeR's demo preprocessing, its cameras, the prior file and
the make-priors job (docs/hamer.md)."""
