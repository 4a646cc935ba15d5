//! What the CPU kernels' tests (tiled_tests.rs, stream_tests.rs) share: a random case of
//! given shapes over a paged cache whose blocks are shuffled, the conversions between
//! f32 and the cache types, and the comparisons of two outputs.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;

use super::{AttentionMetadata, Dims, Element};

pub(super) struct Case {
    pub(super) dims: Dims,
    pub(super) meta: AttentionMetadata,
    pub(super) q: Vec<f32>,
    pub(super) k: Vec<f32>,
    pub(super) v: Vec<f32>,
}

impl Case {
    /// `seqs` as (queries, context length), each on blocks drawn at random from a cache
    /// with `spare` blocks more than they need; queries, keys and values uniform.
    pub(super) fn random(
        rng: &mut StdRng,
        dims: Dims,
        seqs: &[(usize, usize)],
        spare: usize,
    ) -> Case {
        let Dims { h, kvh, d, bs } = dims;
        let need: usize = seqs.iter().map(|&(_, l)| l.div_ceil(bs)).sum();
        let num_blocks = need + spare;
        let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
        ids.shuffle(rng);
        let mut meta = AttentionMetadata::new(bs);
        let mut next = 0;
        for &(ql, l) in seqs {
            let nb = l.div_ceil(bs);
            meta.push(ql, l, &ids[next..next + nb]);
            next += nb;
        }
        let mut vals = |n: usize, amp: f32| -> Vec<f32> {
            (0..n)
                .map(|_| amp * rng.random_range(-1.0f32..1.0))
                .collect()
        };
        let cache = num_blocks * bs * kvh * d;
        // Larger queries make the softmax peaky, so errors in the weighting show.
        let q = vals(meta.num_tokens() * h * d, 3.0);
        let (k, v) = (vals(cache, 1.0), vals(cache, 1.0));
        Case {
            dims,
            meta,
            q,
            k,
            v,
        }
    }

    /// The case's shapes, for a failure's message.
    pub(super) fn describe(&self, what: &str) -> String {
        let Dims { h, kvh, d, bs } = self.dims;
        format!(
            "{what}: heads {h}/{kvh} d {d} bs {bs} seqs {:?} queries {:?}",
            self.meta.seq_lens, self.meta.query_start
        )
    }
}

pub(super) fn convert<E: Element + Default>(x: &[f32]) -> Vec<E> {
    let mut out = vec![E::default(); x.len()];
    E::store(x, &mut out);
    out
}

pub(super) fn widen<E: Element>(x: &[E]) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    E::load(x, &mut out);
    out
}

pub(super) fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

pub(super) fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}
