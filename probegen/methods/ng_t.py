"""NG-T (Kofinas et al., ICLR 2024): the network as a graph (probegen/nn/graphs.py), a relational
transformer over its nodes with edge features in queries, keys and values and edge updates
(probegen/nn/relational.py), readout = the output units' node embeddings concatenated, then an MLP.

Dense attention over each graph's nodes, padded to the batch's largest graph with a mask (59-173 nodes
for the CNN zoos, 67 for the DWSNets SIREN). Runs on every family with a layout; invariant by
construction to the layout's hidden-unit permutations.

cfg (defaults = the reference INR config): hidden (64: d_node), layers (4), d_edge (32), d_attn_hid
(128), d_node_hid (128), d_edge_hid (64), heads (8), dropout (0.2), modulate_v (true), reverse_edges
(false), d_out_hid (128) and head_layers (2: linear layers of the readout MLP; the reference's CNN readout
has 3), fourier_dim (128), inp_factor (1), act_embed (true), standardize (true), augment (false).
Reference CNN configs: CIFAR10-GS hidden 128, d_edge 64; Wild Park hidden 32, d_edge 16, layers 3,
heads 4; both head_layers 3.
"""

from probegen.errors import ProbegenError
from probegen.methods import register
from probegen.methods.base import Method
from probegen.methods.classifier import Classifier
from probegen.nn.graphs import GraphBuilder, GraphEncoder, check_cfg, flops_per_arch, to_dense
from probegen.nn.relational import RelationalTransformer

POSITIVE = ("hidden", "layers", "d_edge", "d_attn_hid", "d_node_hid", "d_edge_hid", "heads", "d_out_hid",
            "head_layers", "fourier_dim")


@register("ng_t", "weights")
class NGT(Method):
    defaults = {"hidden": 64, "layers": 4, "d_edge": 32, "d_attn_hid": 128, "d_node_hid": 128, "d_edge_hid": 64,
                "heads": 8, "dropout": 0.2, "modulate_v": True, "reverse_edges": False, "d_out_hid": 128,
                "head_layers": 2, "fourier_dim": 128, "inp_factor": 1.0, "act_embed": True, "standardize": True,
                "augment": False}
    stackable = False  # dropout in the forward, data-dependent graph assembly: seeds train one by one

    def __init__(self, zoo, cfg, num_probes=None, probe_pool=None):
        super().__init__(zoo, cfg)
        check_cfg("ng_t", cfg, positive=POSITIVE, fractions=("dropout",))
        if cfg["d_attn_hid"] % cfg["heads"]:
            raise ProbegenError(f"method.ng_t: d_attn_hid {cfg['d_attn_hid']} is not divisible by heads "
                                f"{cfg['heads']}")
        if not cfg["inp_factor"] > 0:
            raise ProbegenError(f"method.ng_t: inp_factor: expected a positive number, got {cfg['inp_factor']!r}")
        try:
            self.graphs = GraphBuilder(self.family, self.archs, reverse=cfg["reverse_edges"],
                                       standardize=cfg["standardize"])
        except ProbegenError as err:
            raise ProbegenError(f"method 'ng_t': cannot run on the {self.family} family ({err})") from None
        d = cfg["hidden"]
        self.encoder = GraphEncoder(self.graphs.shape, d, cfg["d_edge"], cfg["fourier_dim"],
                                    float(cfg["inp_factor"]), cfg["act_embed"])
        self.rt = RelationalTransformer(d, cfg["d_edge"], cfg["d_attn_hid"], cfg["d_node_hid"], cfg["d_edge_hid"],
                                        cfg["layers"], cfg["heads"], cfg["dropout"], cfg["modulate_v"])
        self.head = Classifier(self.graphs.num_outputs * d, self.out_dim, cfg["d_out_hid"], cfg["head_layers"])
        self._flops = None

    def prepare(self, zoo, train_idx):
        self.graphs.prepare(zoo, train_idx)

    def forward(self, weights, arch_ids):
        g = self.graphs(weights, arch_ids)
        no_edge = self.encoder.edges(g.edge_x.new_zeros(1, g.edge_x.shape[-1]))[0]  # (d_edge,)
        x, e, mask, outputs = to_dense(g, self.encoder.nodes(g), self.encoder.edges(g.edge_x), no_edge)
        x = self.rt(x, e, mask)  # (B, N_max, d)
        readout = x.gather(1, outputs[..., None].expand(-1, -1, x.shape[-1]))  # (B, n_out, d)
        return self._output(self.head(readout.flatten(1)))

    def flops_per_model(self):
        """Counted matmul FLOPs of the forward (flops_per_arch), plus the attention scores q_ij . k_ij: an
        elementwise product and sum over (B, N, N, d_attn) that the counter does not see, 2 N^2 d_attn per
        layer for a graph of N nodes."""
        if self._flops is None:
            counted = flops_per_arch(self)
            scores = [2 * self.cfg["layers"] * self.graphs.template(a, "cpu").num_nodes ** 2 * self.cfg["d_attn_hid"]
                      if count else 0 for a, count in enumerate(self.arch_counts)]
            self._flops = self._mean_over_archs([c + s for c, s in zip(counted, scores)])
        return self._flops
