## lme4 fits of InstEval at tight tolerance, for the 1e-6 comparison (the default
## control of insteval_reference.R stops earlier).  Run from the repository root:
##   Rscript tests/reference/multicomp/insteval_tight.R
## Writes insteval_tight_REML.csv and insteval_tight_ML.csv next to this script
## (quantity, name, value; 17 significant digits).
suppressPackageStartupMessages(library(lme4))
args <- commandArgs(trailingOnly = FALSE)
here <- dirname(normalizePath(sub("^--file=", "", args[grep("^--file=", args)])))
source(file.path(here, "..", "common.R"))   # fmt17, tight_ctrl, fit_capture

data("InstEval", package = "lme4")
form <- y ~ service + (1 | s) + (1 | d) + (1 | dept:service)
for (reml in c(TRUE, FALSE)) {
  meth <- if (reml) "REML" else "ML"
  r <- fit_capture(lmer(form, data = InstEval, REML = reml, control = tight_ctrl()))
  fit <- r$fit
  vc <- as.data.frame(VarCorr(fit))
  se <- sqrt(diag(as.matrix(vcov(fit))))
  num <- function(q, n, v) data.frame(quantity = q, name = n, value = fmt17(v))
  out <- rbind(
    num("loglik", "", as.numeric(logLik(fit))),
    num("variance", vc$grp, vc$vcov),
    num("fixef", names(fixef(fit)), unname(fixef(fit))),
    num("se", names(se), unname(se)),
    data.frame(quantity = "messages", name = "",
               value = paste(gsub("[,\n\r]+", ";", r$msgs), collapse = " | ")))
  write.csv(out, file.path(here, sprintf("insteval_tight_%s.csv", meth)), row.names = FALSE,
            quote = FALSE)
  cat(meth, "logLik", fmt17(as.numeric(logLik(fit))), "\n")
}
cat("R", R.version.string, "lme4", as.character(packageVersion("lme4")), "\n")
