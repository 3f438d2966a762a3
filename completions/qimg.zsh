
#compdef qimg

_qimg_completion() {
  eval $(env _TYPER_COMPLETE_ARGS="${words[1,$CURRENT]}" _QIMG_COMPLETE=complete_zsh qimg)
}

compdef _qimg_completion qimg

