"""NG-GNN (Kofinas et al., ICLR 2024): the network as a graph (probegen/nn/graphs.py), a PNA graph network
with FiLM edge modulation and edge updates (probegen/nn/pna.py), readout = the output units' node
embeddings concatenated, then an MLP (3 linear layers of width `hidden`, ReLU).

Runs on every family with a layout: MLPs / INRs (one node per neuron), CNNs (one node per channel, kernels
as edge features), Wild Park (residual edges, one graph per architecture in a mixed batch). Invariant by
construction to the layout's hidden-unit permutations: a permuted model is the same graph relabelled.

cfg (defaults = the reference INR config): hidden (32: node and edge width), layers (4 PNA layers),
dropout (0.2), reverse_edges (true), fourier_dim (128 random Fourier features per scalar input),
inp_factor (3: their std), act_embed (true: activation-type embedding of hidden units), standardize (true:
one mean / std per layer's weights and biases, train split), augment (false).
Reference CNN configs: CIFAR10-GS hidden 256, Wild Park hidden 64, both reverse_edges false.
"""

from probegen.errors import ProbegenError
from probegen.methods import register
from probegen.methods.base import Method
from probegen.methods.classifier import Classifier
from probegen.nn.graphs import GraphBuilder, GraphEncoder, check_cfg, flops_per_arch
from probegen.nn.pna import PNA


@register("ng_gnn", "weights")
class NGGNN(Method):
    defaults = {"hidden": 32, "layers": 4, "dropout": 0.2, "reverse_edges": True, "fourier_dim": 128,
                "inp_factor": 3.0, "act_embed": True, "standardize": True, "augment": False}
    # Dropout draws random numbers in the forward and graphs are assembled with data-dependent indexing:
    # seeds train one after another rather than as one vmapped ensemble.
    stackable = False

    def __init__(self, zoo, cfg, num_probes=None, probe_pool=None):
        super().__init__(zoo, cfg)
        check_cfg("ng_gnn", cfg, positive=("hidden", "layers", "fourier_dim"), fractions=("dropout",))
        if not cfg["inp_factor"] > 0:
            raise ProbegenError(f"method.ng_gnn: inp_factor: expected a positive number, got {cfg['inp_factor']!r}")
        try:
            self.graphs = GraphBuilder(self.family, self.archs, reverse=cfg["reverse_edges"],
                                       standardize=cfg["standardize"])
        except ProbegenError as err:
            raise ProbegenError(f"method 'ng_gnn': cannot run on the {self.family} family ({err})") from None
        d = cfg["hidden"]
        self.encoder = GraphEncoder(self.graphs.shape, d, d, cfg["fourier_dim"], float(cfg["inp_factor"]),
                                    cfg["act_embed"])
        self.gnn = PNA(d, cfg["layers"], self.graphs.degree_histogram(self.arch_counts), cfg["dropout"])
        self.head = Classifier(self.graphs.num_outputs * d, self.out_dim, d, 3)
        self._flops = None

    def prepare(self, zoo, train_idx):
        self.graphs.prepare(zoo, train_idx)

    def forward(self, weights, arch_ids):
        g = self.graphs(weights, arch_ids)
        x = self.gnn(self.encoder.nodes(g), g.edge_index, self.encoder.edges(g.edge_x))  # (N_total, d)
        return self._output(self.head(x[g.output_nodes].flatten(1)))  # output units in order -> (B, n_out d)

    def flops_per_model(self):
        if self._flops is None:
            self._flops = self._mean_over_archs(flops_per_arch(self))
        return self._flops
