## pbkrtest's Kenward-Roger adjustment for a known-covariance (kinship) model, which lme4 cannot
## fit: V = sigma_g^2 K + sigma_e^2 I on the recla mice, at R/lmmlite's REML estimates
## (tests/reference/lmmlite/lmmlite_reml.csv) for the phenotypes observed in all 261 mice and
## fitted inside the parameter space. pbkrtest's vcovAdj_internal takes V's linear pieces
## G = (K, I) directly. Writes kinship_vcov.csv and kinship_lbddf.csv.
## Run from the repository root:  Rscript tests/reference/kr/kr_kinship.R
suppressMessages({library(pbkrtest); library(Matrix)})
source("tests/reference/common.R")
out <- "tests/reference/kr"
K <- as.matrix(read.csv(gzfile("tests/reference/recla/kinship.csv.gz"), row.names = 1))
pheno <- read.csv("tests/reference/recla/pheno.csv", row.names = 1, check.names = FALSE)
X <- as.matrix(read.csv("tests/reference/recla/covar.csv", row.names = 1))
est <- read.csv("tests/reference/lmmlite/lmmlite_reml.csv")
use <- head(est[est$n == nrow(X) & est$boundary == "interior", ], 8)
vc_rows <- list(); lb_rows <- list()
for (i in seq_len(nrow(use))) {
  ph <- use$phenotype[i]
  Sigma <- use$sigmasq_g[i] * K + use$sigmasq_e[i] * diag(nrow(X))
  SigmaG <- list(Sigma = Matrix(Sigma), G = list(Matrix(K), Diagonal(nrow(X))), n.ggamma = 2)
  Phi <- solve(t(X) %*% solve(Sigma, X))
  Vadj <- pbkrtest:::vcovAdj_internal(Matrix(Phi), SigmaG, X)
  PhiA <- as.matrix(Vadj)
  p <- ncol(X)
  vc_rows[[i]] <- data.frame(phenotype = ph, row = rep(colnames(X), p),
                             col = rep(colnames(X), each = p), vcov = as.vector(Phi),
                             vcov_adj = as.vector(PhiA), stringsAsFactors = FALSE)
  lb_rows[[i]] <- data.frame(phenotype = ph, term = colnames(X),
                             df = sapply(seq_len(p), function(j) {
                               L <- matrix(0, 1, p); L[j] <- 1; Lb_ddf(L, Phi, Vadj)}),
                             stringsAsFactors = FALSE)
}
write_ref(do.call(rbind, vc_rows), file.path(out, "kinship_vcov.csv"))
write_ref(do.call(rbind, lb_rows), file.path(out, "kinship_lbddf.csv"))
