_auditctl_completion() {
    local IFS=$'\n'
    local response

    response=$(env COMP_LINE="$COMP_LINE" COMP_POINT="$COMP_POINT" COMP_WORDS="${COMP_WORDS[*]}" COMP_CWORD=$COMP_CWORD _AUDITCTL_COMPLETE=bash_complete $1)

    for completion in $response; do
        IFS=',' read type value <<< "$completion"

        if [[ $type == 'dir' ]]; then
            COMPREPLY=()
            compopt -o dirnames
        elif [[ $type == 'file' ]]; then
            COMPREPLY=()
            compopt -o default
        elif [[ $type == 'plain' ]]; then
            COMPREPLY+=($value)
        fi
    done

    return 0
}

_auditctl_completion_setup() {
    complete -o nosort -F _auditctl_completion auditctl
}

_auditctl_completion_setup;
