//! The statistics behind the comparison: a bounded window of samples with its
//! percentiles, and how alike two outputs are.

use std::collections::VecDeque;

use serde_json::{json, Value};

/// The most recent samples a window keeps (older ones drop out).
pub const WINDOW: usize = 1024;
/// Text longer than this many characters is compared on its first this-many: the
/// edit distance grows with the product of the lengths (`levenshtein`: ~1 M word
/// steps at this length, a few ms).
pub const SIMILARITY_MAX_CHARS: usize = 8192;
/// A pair of texts "agrees" above this similarity.
pub const AGREE_ABOVE: f64 = 0.9;

/// The last `WINDOW` samples of one figure.
#[derive(Debug, Default, Clone)]
pub struct Window {
    samples: VecDeque<f64>,
}

impl Window {
    pub fn push(&mut self, x: f64) {
        if !x.is_finite() {
            return;
        }
        if self.samples.len() == WINDOW {
            self.samples.pop_front();
        }
        self.samples.push_back(x);
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    pub fn mean(&self) -> Option<f64> {
        (!self.samples.is_empty())
            .then(|| self.samples.iter().sum::<f64>() / self.samples.len() as f64)
    }

    /// The nearest-rank percentiles `ps` (each in 0..=100) of the window.
    pub fn percentiles(&self, ps: &[f64]) -> Vec<Option<f64>> {
        let mut v: Vec<f64> = self.samples.iter().copied().collect();
        v.sort_by(f64::total_cmp);
        ps.iter().map(|p| percentile(&v, *p)).collect()
    }

    /// `{p50, p95, p99, mean, n}` (null where there are no samples).
    pub fn summary(&self) -> Value {
        let p = self.percentiles(&[50.0, 95.0, 99.0]);
        json!({"p50": p[0], "p95": p[1], "p99": p[2], "mean": self.mean(), "samples": self.len()})
    }
}

/// Nearest-rank percentile of sorted values: the smallest value with at least `p`% of
/// the values at or below it.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p.clamp(0.0, 100.0) / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// 1 − Levenshtein distance ÷ the longer length, on characters (1 for two empty
/// texts), over each text's first `SIMILARITY_MAX_CHARS` characters.
pub fn text_similarity(a: &str, b: &str) -> f64 {
    let cut = |s: &str| -> Vec<char> { s.chars().take(SIMILARITY_MAX_CHARS).collect() };
    let (a, b) = (cut(a), cut(b));
    let longer = a.len().max(b.len());
    if longer == 0 {
        return 1.0;
    }
    1.0 - super::levenshtein::distance(&a, &b) as f64 / longer as f64
}

/// What a prediction's output is, for comparing.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputKind {
    /// Text (streamed chunks joined).
    Text(String),
    /// Files: each one's content type and size when known (a data URL), else None.
    Files(Vec<Option<(String, usize)>>),
}

fn is_file_url(s: &str) -> bool {
    (s.starts_with("data:") || s.starts_with("https://") || s.starts_with("http://"))
        && !s.contains(char::is_whitespace)
}

/// A data URL's content type and decoded size (None for other URLs).
fn data_url_meta(s: &str) -> Option<(String, usize)> {
    let rest = s.strip_prefix("data:")?;
    let (meta, data) = rest.split_once(',')?;
    let base64 = meta.ends_with(";base64");
    let ctype = meta
        .trim_end_matches(";base64")
        .split(';')
        .next()
        .filter(|t| !t.is_empty())
        .unwrap_or("text/plain")
        .to_ascii_lowercase();
    let size = if base64 {
        let body = data.trim_end_matches('=');
        body.len() * 3 / 4
    } else {
        data.len()
    };
    Some((ctype, size))
}

/// Classifies a record's output (a list of chunks, as hearth stores it): every
/// chunk a URL is files, anything else text.
pub fn classify(output: &[String]) -> OutputKind {
    if !output.is_empty() && output.iter().all(|x| is_file_url(x)) {
        OutputKind::Files(output.iter().map(|x| data_url_meta(x)).collect())
    } else {
        OutputKind::Text(output.concat())
    }
}

/// How two outputs of one shadowed pair agree.
#[derive(Debug, Clone, PartialEq)]
pub enum Agreement {
    Text {
        exact: bool,
        similarity: f64,
    },
    /// Files: same count, each with the same content type and sizes within 10%.
    Files {
        exact: bool,
        agree: bool,
    },
    /// Files whose sizes cannot be known here (plain URLs): only equality is known.
    FilesUnknown {
        exact: bool,
    },
}

impl Agreement {
    pub fn exact(&self) -> bool {
        match self {
            Agreement::Text { exact, .. }
            | Agreement::Files { exact, .. }
            | Agreement::FilesUnknown { exact } => *exact,
        }
    }
}

pub fn agreement(a: &[String], b: &[String]) -> Agreement {
    match (classify(a), classify(b)) {
        // Equal texts are similar by definition: no quadratic edit distance for the
        // common case of two sides that agree.
        (OutputKind::Text(x), OutputKind::Text(y)) => Agreement::Text {
            exact: x == y,
            similarity: if x == y { 1.0 } else { text_similarity(&x, &y) },
        },
        (OutputKind::Files(x), OutputKind::Files(y)) => {
            let exact = a == b;
            if x.len() != y.len() {
                return Agreement::Files {
                    exact,
                    agree: false,
                };
            }
            let mut agree = true;
            for (p, q) in x.iter().zip(&y) {
                match (p, q) {
                    (Some((t1, s1)), Some((t2, s2))) => {
                        let (lo, hi) = ((*s1).min(*s2) as f64, (*s1).max(*s2) as f64);
                        agree &= t1 == t2 && (hi == 0.0 || (hi - lo) / hi <= 0.10);
                    }
                    _ => return Agreement::FilesUnknown { exact },
                }
            }
            Agreement::Files { exact, agree }
        }
        // Text on one side, files on the other.
        _ => Agreement::Files {
            exact: false,
            agree: false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 95.0), Some(95.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&v, 100.0), Some(100.0));
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
        // 10 values: p10 is the first, p11 the second.
        let t: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(percentile(&t, 10.0), Some(1.0));
        assert_eq!(percentile(&t, 11.0), Some(2.0));
    }

    #[test]
    fn a_window_keeps_only_its_last_samples_in_any_order() {
        let mut w = Window::default();
        for x in (0..WINDOW + 500).rev() {
            w.push(x as f64);
        }
        w.push(f64::NAN);
        assert_eq!(w.len(), WINDOW);
        // The newest WINDOW values are 0..WINDOW (pushed last, descending).
        let p = w.percentiles(&[0.0, 50.0, 100.0]);
        assert_eq!(p[0], Some(0.0));
        assert_eq!(p[1], Some((WINDOW / 2 - 1) as f64));
        assert_eq!(p[2], Some((WINDOW - 1) as f64));
        assert_eq!(w.mean(), Some((WINDOW - 1) as f64 / 2.0));
        assert!(Window::default().summary()["p50"].is_null());
    }

    #[test]
    fn similarity_is_one_minus_edit_distance_over_the_longer_text() {
        assert_eq!(text_similarity("", ""), 1.0);
        assert_eq!(text_similarity("abc", "abc"), 1.0);
        assert_eq!(text_similarity("abc", ""), 0.0);
        // kitten → sitting: 3 edits, longer length 7.
        assert!((text_similarity("kitten", "sitting") - (1.0 - 3.0 / 7.0)).abs() < 1e-12);
        // Characters, not bytes: one substitution (a 2-byte character) in 5.
        assert!((text_similarity("héllo", "hello") - 0.8).abs() < 1e-12);
        let long_a = "a".repeat(SIMILARITY_MAX_CHARS + 100);
        let long_b = format!("{}{}", "a".repeat(SIMILARITY_MAX_CHARS), "b".repeat(100));
        assert_eq!(text_similarity(&long_a, &long_b), 1.0);
    }

    #[test]
    fn outputs_are_compared_by_kind() {
        let t = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let a = agreement(&t(&["Hel", "lo"]), &t(&["Hello"]));
        assert_eq!(
            a,
            Agreement::Text {
                exact: true,
                similarity: 1.0
            }
        );
        let a = agreement(&t(&["Hello"]), &t(&["Help"]));
        assert!(!a.exact());
        // Data URLs: same type, sizes 100 and 95 bytes agree; 100 and 80 do not.
        let data = |n: usize| format!("data:image/png;base64,{}", "A".repeat(n * 4 / 3));
        let a = agreement(&t(&[&data(99)]), &t(&[&data(95)]));
        assert_eq!(
            a,
            Agreement::Files {
                exact: false,
                agree: true
            }
        );
        let a = agreement(&t(&[&data(99)]), &t(&[&data(80)]));
        assert_eq!(
            a,
            Agreement::Files {
                exact: false,
                agree: false
            }
        );
        let other = "data:image/jpeg;base64,".to_string() + &"A".repeat(132);
        assert_eq!(
            agreement(&t(&[&data(99)]), &t(&[&other])),
            Agreement::Files {
                exact: false,
                agree: false
            }
        );
        assert_eq!(
            agreement(&t(&["https://x/a.png"]), &t(&["https://y/a.png"])),
            Agreement::FilesUnknown { exact: false }
        );
        assert!(!agreement(&t(&["hello"]), &t(&["https://y/a.png"])).exact());
        // A sentence is text even when it mentions a URL.
        assert!(matches!(
            classify(&t(&["see https://x.y"])),
            OutputKind::Text(_)
        ));
    }
}
