"""aggregate: metrics/summary.{json,md} and plots/summary/*.png over zoos x methods x seeds."""

from probegen import config
from probegen.aggregate import aggregate
from probegen.errors import cli


@cli
def main():
    params = config.load_params()
    zoos = config.zoo_names(params)
    methods = config.method_names(params, "probe") + config.method_names(params, "weights")
    summary = aggregate(zoos, methods, config.seeds(params))
    for zoo, by_method in summary.items():
        for method, r in by_method.items():
            print(f"{zoo:12s} {method:10s} {r['metric']}: {r['test_mean']:.4f} ± {r['test_std']:.4f}")


if __name__ == "__main__":
    main()
