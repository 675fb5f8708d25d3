"""Training: data loading over prepared stores, models, Ray Train loops, model registry."""
