//! The optimiser: SGD with momentum and weight decay, as `torch.optim.SGD`.

use std::collections::BTreeMap;

use tch::Tensor;

/// SGD as `torch.optim.SGD(lr, momentum, weight_decay)`: d = g + wd·p; buf = m·buf + d (buf = d at
/// the first step); p -= lr·buf.
pub(super) struct Sgd {
    pub params: Vec<(String, Tensor)>,
    pub momentum: BTreeMap<String, Tensor>,
    pub mu: f64,
    pub weight_decay: f64,
}

impl Sgd {
    pub fn zero_grad(&mut self) {
        for (_, p) in &mut self.params {
            p.zero_grad();
        }
    }

    pub fn step(&mut self, lr: f64) {
        tch::no_grad(|| {
            for (name, p) in &mut self.params {
                let grad = p.grad();
                if !grad.defined() {
                    continue;
                }
                let d = grad + p.multiply_scalar(self.weight_decay);
                let buf = match self.momentum.get_mut(name) {
                    Some(buf) => {
                        let _ = buf.g_mul_scalar_(self.mu).g_add_(&d);
                        buf.shallow_clone()
                    }
                    None => {
                        let buf = d.detach().copy();
                        self.momentum.insert(name.clone(), buf.shallow_clone());
                        buf
                    }
                };
                let _ = p.g_sub_(&buf.multiply_scalar(lr));
            }
        });
    }
}
