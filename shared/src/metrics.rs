//! Prometheus text exposition (format 0.0.4) for the coordinator's and the agent's `/metrics`,
//! and a lock-free latency histogram.
//!
//! Ensures: label values are escaped as the format requires (a tenant or host id cannot break a
//! line); every family is announced once with HELP and TYPE before its samples.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The content type of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A family with one sample per item (tenant): name, type, help, and how to read the value.
pub type Figure<T> = (&'static str, &'static str, &'static str, fn(&T) -> f64);

/// A metrics page being written.
#[derive(Debug, Default)]
pub struct Exposition {
    text: String,
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Exposition {
    /// Announces a family: `kind` is `gauge`, `counter` or `histogram`.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    /// One sample of the family announced last.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{k}=\"{}\"", escape(v));
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {value}");
    }

    /// One family per figure, each with a sample per item labelled by `labels`.
    pub fn per_item<T>(
        &mut self,
        figures: &[Figure<T>],
        items: &[T],
        labels: impl for<'a> Fn(&'a T) -> Vec<(&'static str, &'a str)>,
    ) {
        for (name, kind, help, value) in figures {
            self.family(name, kind, help);
            for item in items {
                self.sample(name, &labels(item), value(item));
            }
        }
    }

    /// A family with a single unlabelled sample.
    pub fn single(&mut self, name: &str, kind: &str, help: &str, value: f64) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }

    pub fn into_string(self) -> String {
        self.text
    }
}

/// Bucket bounds of [`Histogram`], in seconds.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// A latency histogram with fixed buckets ([`LATENCY_BUCKETS`]), updated without locks.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let seconds = d.as_secs_f64();
        for (bound, bucket) in LATENCY_BUCKETS.iter().zip(&self.buckets) {
            if seconds <= *bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// Writes the histogram as family `name`.
    pub fn write(&self, out: &mut Exposition, name: &str, help: &str) {
        out.family(name, "histogram", help);
        let bucket = format!("{name}_bucket");
        for (bound, count) in LATENCY_BUCKETS.iter().zip(&self.buckets) {
            out.sample(
                &bucket,
                &[("le", &bound.to_string())],
                count.load(Ordering::Relaxed) as f64,
            );
        }
        let count = self.count.load(Ordering::Relaxed) as f64;
        out.sample(&bucket, &[("le", "+Inf")], count);
        out.sample(
            &format!("{name}_sum"),
            &[],
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
        );
        out.sample(&format!("{name}_count"), &[], count);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_escaped_and_histograms_cumulative() {
        let mut out = Exposition::default();
        out.family("berth_x", "gauge", "An example.");
        out.sample("berth_x", &[("host", "a\"b\\c\nd"), ("kind", "total")], 1.5);
        let h = Histogram::default();
        h.observe(Duration::from_micros(800));
        h.observe(Duration::from_millis(30));
        h.write(&mut out, "berth_d_seconds", "Durations.");
        let text = out.into_string();
        assert!(text.starts_with("# HELP berth_x An example.\n# TYPE berth_x gauge\n"));
        assert!(text.contains("berth_x{host=\"a\\\"b\\\\c\\nd\",kind=\"total\"} 1.5\n"));
        assert!(text.contains("berth_d_seconds_bucket{le=\"0.0005\"} 0\n"));
        assert!(text.contains("berth_d_seconds_bucket{le=\"0.001\"} 1\n"));
        assert!(text.contains("berth_d_seconds_bucket{le=\"0.05\"} 2\n"));
        assert!(text.contains("berth_d_seconds_bucket{le=\"+Inf\"} 2\n"));
        assert!(text.contains("berth_d_seconds_sum 0.0308\n"));
        assert!(text.contains("berth_d_seconds_count 2\n"));
    }
}

/// Reading metrics back in tests, through a real Prometheus text-format parser.
#[cfg(feature = "test-support")]
pub mod testing {
    /// The value of the one sample of `name` with `labels` (among others) in `text`; panics
    /// when there is none or more than one, or when the text does not parse.
    pub fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
        let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
            .expect("Prometheus text format");
        let found: Vec<_> = scrape
            .samples
            .iter()
            .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .collect();
        assert_eq!(found.len(), 1, "{name} {labels:?} in\n{text}");
        match &found[0].value {
            prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            other => panic!("{name}: not a single value: {other:?}"),
        }
    }

    /// The buckets of histogram `name`.
    pub fn histogram(text: &str, name: &str) -> Vec<(f64, f64)> {
        let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
            .expect("Prometheus text format");
        let sample = scrape
            .samples
            .iter()
            .find(|s| s.metric == name)
            .unwrap_or_else(|| panic!("no histogram {name}"));
        match &sample.value {
            prometheus_parse::Value::Histogram(buckets) => {
                buckets.iter().map(|b| (b.less_than, b.count)).collect()
            }
            other => panic!("{name}: not a histogram: {other:?}"),
        }
    }
}
