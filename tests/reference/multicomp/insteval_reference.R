## lme4 reference fit and timing for lme4's InstEval data (73421 ratings).
## Run from the repository root:
##   Rscript tests/reference/multicomp/insteval_reference.R
## Writes, next to this script:
##   insteval.csv.gz          the data (columns s, d, dept, service, y), if the gzip is < 2 MB
##   insteval_REML.csv,       y ~ service + (1|s) + (1|d) + (1|dept:service) fitted with
##   insteval_ML.csv          lme4::lmer, default control (nloptwrap); long format
##                            (quantity, name, value)
##   insteval_timing.csv      system.time(lmer(...)) elapsed for 3 runs per method, median
suppressPackageStartupMessages(library(lme4))
args <- commandArgs(trailingOnly = FALSE)
here <- dirname(normalizePath(sub("^--file=", "", args[grep("^--file=", args)])))
source(file.path(here, "..", "common.R"))   # fmt17, write_ref, fit_capture

data("InstEval", package = "lme4")
dat <- InstEval[, c("s", "d", "dept", "service", "y")]
gz <- file.path(here, "insteval.csv.gz")
tmp <- tempfile(fileext = ".csv.gz")
con <- gzfile(tmp, "w", compression = 9)
write.csv(data.frame(lapply(dat, as.character), stringsAsFactors = FALSE), con,
          row.names = FALSE, quote = FALSE)
close(con)
if (file.size(tmp) < 2e6) {
  file.copy(tmp, gz, overwrite = TRUE)
  cat(sprintf("wrote %s (%d bytes)\n", gz, file.size(gz)))
} else {
  cat(sprintf("insteval.csv.gz would be %d bytes (>= 2 MB); not written\n", file.size(tmp)))
}
unlink(tmp)

form <- y ~ service + (1 | s) + (1 | d) + (1 | dept:service)
n_runs <- 3
cpu <- tryCatch(sub(".*: ", "", grep("^model name", readLines("/proc/cpuinfo"), value = TRUE)[1]),
                error = function(e) NA_character_)
timing <- list()
for (reml in c(TRUE, FALSE)) {
  meth <- if (reml) "REML" else "ML"
  el <- numeric(n_runs); us <- numeric(n_runs)
  fit <- NULL; msgs <- character(0)
  for (i in seq_len(n_runs)) {
    gc()
    tm <- system.time(r <- fit_capture(lmer(form, data = InstEval, REML = reml)))
    el[i] <- tm[["elapsed"]]; us[i] <- tm[["user.self"]]
    fit <- r$fit; msgs <- unique(c(msgs, r$msgs))
  }
  stopifnot(identical(names(fixef(fit)), c("(Intercept)", "service1")))
  vc <- as.data.frame(VarCorr(fit))
  th <- getME(fit, "theta")
  se <- sqrt(diag(as.matrix(vcov(fit))))
  m <- unique(unlist(c(msgs, fit@optinfo$conv$lme4$messages, fit@optinfo$warnings)))
  m <- gsub("[,\n\r]+", ";", m)
  num <- function(q, n, v) data.frame(quantity = q, name = n, value = fmt17(v), stringsAsFactors = FALSE)
  chr <- function(q, n, v) data.frame(quantity = q, name = n, value = as.character(v), stringsAsFactors = FALSE)
  out <- rbind(
    num("loglik", "", as.numeric(logLik(fit))),
    num("criterion", if (reml) "REMLcrit" else "deviance", if (reml) REMLcrit(fit) else deviance(fit)),
    num("variance", vc$grp, vc$vcov),
    num("theta", sub("\\.\\(Intercept\\)$", "", names(th)), unname(th)),
    num("fixef", names(fixef(fit)), unname(fixef(fit))),
    num("se", names(se), unname(se)),
    num("elapsed_median", "lmer", median(el)),
    chr("term_patsy", c("(Intercept)", "service1"), c("Intercept", "service[T.1]")),
    chr("nobs", "", nobs(fit)),
    chr("optimizer", "", fit@optinfo$optimizer),
    chr("optimizer_code", "", fit@optinfo$conv$opt),
    chr("feval", "", fit@optinfo$feval),
    chr("singular", "", as.integer(isSingular(fit))),
    chr("messages", "", paste(m, collapse = " | ")),
    chr("version", c("R", "lme4", "Matrix"),
        c(as.character(getRversion()), as.character(packageVersion("lme4")),
          as.character(packageVersion("Matrix"))))
  )
  write.table(out, file.path(here, sprintf("insteval_%s.csv", meth)), sep = ",",
              quote = FALSE, row.names = FALSE, na = "NA")
  timing[[meth]] <- data.frame(
    method = meth, elapsed_run1 = el[1], elapsed_run2 = el[2], elapsed_run3 = el[3],
    elapsed_median = median(el), user_median = median(us), nobs = nobs(fit),
    R = as.character(getRversion()), lme4 = as.character(packageVersion("lme4")),
    Matrix = as.character(packageVersion("Matrix")),
    blas = gsub(",", ";", extSoftVersion()[["BLAS"]]), nproc = parallel::detectCores(),
    cpu = gsub(",", ";", cpu), date = format(Sys.Date()), stringsAsFactors = FALSE)
  cat(sprintf("%s: logLik %.6f, elapsed %s (median %.3f s)\n", meth, as.numeric(logLik(fit)),
              paste(sprintf("%.3f", el), collapse = " "), median(el)))
  print(VarCorr(fit), digits = 8)
  if (length(m)) cat("messages:", m, sep = "\n  ")
}
tt <- do.call(rbind, timing)
write.table(tt, file.path(here, "insteval_timing.csv"), sep = ",", quote = FALSE,
            row.names = FALSE)
