//! The trunk's forward and backward for training, with or without activation recompute.
//!
//! Autodiff keeps every intermediate of every layer until `backward` (for attention, the
//! `[heads, t, t]` scores and probabilities of each layer). With recompute, the forward pass runs
//! without autodiff and keeps only each layer's input `[b, t, hidden]`; the backward pass then
//! recomputes one layer at a time with autodiff and back-propagates through it alone with the
//! vector-Jacobian trick of the chunked divergence: for layer `l` with input `x` and output `y`,
//! `d/dθ Σ y ⊙ sg(∂L/∂y) = (∂L/∂y) · ∂y/∂θ`, and the same backward gives `∂L/∂x` for the layer
//! below. Peak activation memory is then one layer's, at the cost of a second forward pass of
//! the layers. The gradients equal the plain path's (test `recompute_gives_the_same_gradients`).

use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Int, Tensor};

use crate::decoder::{CausalLm, Positions, Rope};

/// What the trunk's forward pass kept for its backward pass.
pub struct Trunk<B: AutodiffBackend> {
    /// Final hidden states (after the last norm) `[b, t, hidden]`, with the autodiff graph of the
    /// whole trunk, or, with recompute, of the final norm only.
    pub hidden: Tensor<B, 3>,
    saved: Option<Saved<B>>,
}

struct Saved<B: AutodiffBackend> {
    ids: Tensor<B, 2, Int>,
    pos: Positions,
    /// Input of each layer `[b, t, hidden]`, without a graph.
    inputs: Vec<Tensor<B::InnerBackend, 3>>,
    /// The last layer's output as a leaf: the final norm back-propagates into it.
    last: Tensor<B, 3>,
}

impl<B: AutodiffBackend> Trunk<B> {
    /// A trunk whose hidden states carry the whole graph (no recompute).
    pub fn from_hidden(hidden: Tensor<B, 3>) -> Self {
        Trunk { hidden, saved: None }
    }

    /// Whether the layers will be recomputed in the backward pass.
    pub fn recomputes(&self) -> bool {
        self.saved.is_some()
    }
}

impl<B: AutodiffBackend> CausalLm<B> {
    /// The trunk's forward pass for training (no KV cache); see the module docs.
    ///
    /// # Shapes
    /// - ids: `[b, t]` → [`Trunk::hidden`] `[b, t, hidden]`
    pub fn forward_trunk(&self, ids: Tensor<B, 2, Int>, pos: &Positions, recompute: bool) -> Trunk<B> {
        if !recompute {
            return Trunk { hidden: self.forward_hidden(ids, pos, None), saved: None };
        }
        let [b, t] = ids.dims();
        let inner = self.valid();
        let device = ids.device();
        let c = &self.config;
        let rope = Rope::<B::InnerBackend>::new(&pos.positions, b, t, c, self.dtype(), &device);
        let mask = pos.mask_for::<B::InnerBackend>(c.num_attention_heads, &device);
        let mut x = inner.model.embed_tokens.forward(ids.clone().inner(), self.dtype());
        let mut inputs = Vec::with_capacity(inner.model.layers.len());
        for layer in &inner.model.layers {
            inputs.push(x.clone());
            x = layer.forward(x, &rope, mask.clone(), None).0;
        }
        let last = Tensor::<B, 3>::from_inner(x).require_grad();
        let hidden = self.model.norm.forward(last.clone());
        Trunk { hidden, saved: Some(Saved { ids, pos: pos.clone(), inputs, last }) }
    }

    /// The gradients of `Σ trunk.hidden ⊙ grad` with respect to every parameter of the trunk:
    /// the trunk's share of a loss whose gradient at the final hidden states is `grad`.
    ///
    /// # Shapes
    /// - grad: `[b, t, hidden]`, the same shape as [`Trunk::hidden`]
    pub fn backward_trunk(&self, trunk: Trunk<B>, grad: Tensor<B::InnerBackend, 3>) -> GradientsParams {
        let Trunk { hidden, saved } = trunk;
        let grad = grad.cast(hidden.dtype());
        let grads = (hidden * Tensor::<B, 3>::from_inner(grad)).sum().backward();
        let Some(saved) = saved else {
            return GradientsParams::from_grads(grads, self);
        };
        let mut acc = GradientsAccumulator::<Self>::new();
        let mut g = saved.last.grad(&grads).expect("the final norm reads the last layer's output");
        acc.accumulate(self, GradientsParams::from_grads(grads, self));

        // Layer by layer, last first: recompute with autodiff, back-propagate, free.
        let [b, t] = saved.ids.dims();
        let device = saved.ids.device();
        let c = &self.config;
        let rope = Rope::<B>::new(&saved.pos.positions, b, t, c, self.dtype(), &device);
        let mask = saved.pos.mask_tensor::<B>(&device);
        for (layer, input) in self.model.layers.iter().zip(saved.inputs).rev() {
            let x = Tensor::<B, 3>::from_inner(input).require_grad();
            let (y, _) = layer.forward(x.clone(), &rope, mask.clone(), None);
            let grads = (y * Tensor::<B, 3>::from_inner(g)).sum().backward();
            g = x.grad(&grads).expect("a layer reads its input");
            acc.accumulate(self, GradientsParams::from_grads(grads, self));
        }
        // The embedding (with a tied head, its gradient adds to the head's).
        // (A frozen embedding, as under LoRA, has no graph and nothing to add.)
        // (Ask the weight, a leaf: a computed tensor does not report that it needs a gradient.)
        if self.model.embed_tokens.weight.val().is_require_grad() {
            let e = self.model.embed_tokens.forward(saved.ids, self.dtype());
            let grads = (e * Tensor::<B, 3>::from_inner(g)).sum().backward();
            acc.accumulate(self, GradientsParams::from_grads(grads, self));
        }
        acc.grads()
    }
}
