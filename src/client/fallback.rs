//! Retrieve-then-rerank with the seed service's fallback (`docs/seed-api.md`): when reranking fails, keep the similarity
//! order, so the pipeline stays up (less precisely ranked) while the reranker is down.

use super::{RerankClient, RerankError, RerankOptions};

/// Picks `candidates` in the order of `ranked_indices`, keeping at most `top_k`. Indices out of
/// range or repeated are skipped.
///
/// ```
/// use rerank_service::client::apply_ranking;
/// assert_eq!(apply_ranking(vec!["a", "b", "c"], &[2, 0, 1], 2), vec!["c", "a"]);
/// ```
pub fn apply_ranking<T>(candidates: Vec<T>, ranked_indices: &[usize], top_k: usize) -> Vec<T> {
    let mut slots: Vec<Option<T>> = candidates.into_iter().map(Some).collect();
    ranked_indices
        .iter()
        .filter_map(|&i| slots.get_mut(i).and_then(Option::take))
        .take(top_k)
        .collect()
}

impl RerankClient {
    /// Reranks `candidates` (in similarity order) by `text(candidate)` and returns the best
    /// `top_k`; on a [`RerankError`] logs a warning and returns the first `top_k` candidates in
    /// their original order.
    ///
    /// ```no_run
    /// # async fn demo(client: rerank_service::client::RerankClient) {
    /// struct Project { title: String, description: String }
    /// let candidates: Vec<Project> = Vec::new(); // top_k * 3, from the vector search
    /// let best = client
    ///     .rerank_top_k("AI tools", candidates, 5, |p| format!("{}: {}", p.title, p.description))
    ///     .await;
    /// # }
    /// ```
    pub async fn rerank_top_k<T>(
        &self,
        query: &str,
        candidates: Vec<T>,
        top_k: usize,
        text: impl Fn(&T) -> String,
    ) -> Vec<T> {
        match self.try_rerank_top_k(query, &candidates, top_k, text).await {
            Ok(ranked_indices) => apply_ranking(candidates, &ranked_indices, top_k),
            Err(e) => {
                tracing::warn!(error = %e, "reranking failed, falling back to similarity order");
                candidates.into_iter().take(top_k).collect()
            }
        }
    }

    /// The reranked indices of the best `top_k` candidates, or the error (no fallback).
    pub async fn try_rerank_top_k<T>(
        &self,
        query: &str,
        candidates: &[T],
        top_k: usize,
        text: impl Fn(&T) -> String,
    ) -> Result<Vec<usize>, RerankError> {
        let options = RerankOptions {
            top_k: Some(top_k),
            ..RerankOptions::default()
        };
        let result = self
            .rerank_with(query, candidates.iter().map(text), options)
            .await?;
        Ok(result.ranked_indices)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranking_is_applied_and_cut() {
        assert_eq!(
            apply_ranking(vec![10, 20, 30], &[1, 2, 0], 5),
            vec![20, 30, 10]
        );
        assert_eq!(
            apply_ranking(vec![10, 20, 30], &[1, 1, 9, 0], 2),
            vec![20, 10]
        );
        assert!(apply_ranking(Vec::<u8>::new(), &[0], 3).is_empty());
    }
}
